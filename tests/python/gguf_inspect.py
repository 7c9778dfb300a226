"""Prints what the `gguf` package (llama.cpp's reader) sees in a GGUF file, as JSON:
metadata (arrays longer than 64 as length + head) and tensors (name, shape, type)."""
import json
import sys

from gguf import GGUFReader, GGUFValueType

reader = GGUFReader(sys.argv[1])
fields = {}
for key, field in reader.fields.items():
    if key.startswith("GGUF."):
        continue
    kind = field.types[0]
    if kind == GGUFValueType.ARRAY:
        if field.types[1] == GGUFValueType.STRING:
            values = [bytes(field.parts[i]).decode() for i in field.data]
        else:
            values = [field.parts[i].tolist()[0] for i in field.data]
        fields[key] = values if len(values) <= 64 else {"len": len(values), "head": values[:8]}
    elif kind == GGUFValueType.STRING:
        fields[key] = bytes(field.parts[field.data[0]]).decode()
    else:
        fields[key] = field.parts[field.data[0]].tolist()[0]
tensors = [[t.name, [int(x) for x in t.shape], t.tensor_type.name] for t in reader.tensors]
print(json.dumps({"fields": fields, "tensors": tensors}))
