"""Pure mask, box and RLE math: no I/O, no Ray."""
