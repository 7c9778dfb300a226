"""Dequantizes every tensor of a GGUF file with the `gguf` package (llama.cpp's
reference in numpy) and writes each as raw little-endian f32 to OUT/<name>.f32."""
import os
import sys

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize

reader = GGUFReader(sys.argv[1])
out = sys.argv[2]
for t in reader.tensors:
    values = dequantize(t.data, t.tensor_type).astype("<f4", copy=False)
    with open(os.path.join(out, t.name + ".f32"), "wb") as f:
        f.write(np.ascontiguousarray(values).tobytes())
    print(t.name, t.tensor_type.name, values.size)
