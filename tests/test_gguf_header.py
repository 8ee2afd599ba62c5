"""The GGUF header reader every stage's preflight uses agrees with gguf-py's full reader on every value type, in both
byte orders, and names the file when the header is cut short."""

import numpy as np
import pytest
from gguf import GGUFReader, GGUFValueType, GGUFWriter

from toolchain.models.references import ModelError, gguf_header, gguf_metadata, gguf_strings


def _write(path, endianess=None):
    from gguf import GGUFEndian

    w = GGUFWriter(str(path), "llama", endianess=endianess or GGUFEndian.LITTLE)
    w.add_uint8("t.u8", 7)
    w.add_int8("t.i8", -7)
    w.add_uint16("t.u16", 600)
    w.add_int16("t.i16", -600)
    w.add_uint32("t.u32", 70000)
    w.add_int32("t.i32", -70000)
    w.add_float32("t.f32", 1e-5)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo ✓")
    w.add_uint64("t.u64", 2**40)
    w.add_int64("t.i64", -(2**40))
    w.add_float64("t.f64", 0.1)
    w.add_array("tokenizer.ggml.tokens", ["<s>", "a", "ß", "", "🙂"])
    w.add_array("t.ints", [1, 2, 3])
    w.add_array("t.floats", [0.5, 1.5])
    w.add_tensor("blk.0.w", np.ones((3, 4), dtype=np.float32))
    w.add_tensor("out", np.zeros(5, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _reference(path):
    reader = GGUFReader(str(path), "r")
    meta, lengths = {}, {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        if field.types[0] == GGUFValueType.ARRAY:
            lengths[name] = len(field.data)
        elif field.types[0] == GGUFValueType.STRING:
            meta[name] = bytes(field.parts[field.data[0]]).decode("utf-8")
        else:
            meta[name] = field.parts[field.data[0]].tolist()[0]
    tensors = tuple((t.name, int(t.n_elements)) for t in reader.tensors)
    return meta, lengths, tensors, reader.fields["tokenizer.ggml.tokens"].contents()


@pytest.mark.parametrize("order", ["little", "big"])
def test_header_matches_gguf_py(tmp_path, order):
    from gguf import GGUFEndian

    path = _write(tmp_path / "m.gguf", GGUFEndian.BIG if order == "big" else GGUFEndian.LITTLE)
    meta, lengths, tensors, tokens = _reference(path)
    header = gguf_header(path)
    assert header.meta == meta and header.array_lengths == lengths and header.tensors == tensors
    assert {k: type(v) for k, v in header.meta.items()} == {k: type(v) for k, v in meta.items()}
    assert gguf_metadata(path)["t.str"] == "héllo ✓" and gguf_metadata(path)["t.bool"] is True
    assert gguf_strings(path, "tokenizer.ggml.tokens") == tokens == ["<s>", "a", "ß", "", "🙂"]
    assert gguf_strings(path, "absent") is None
    with pytest.raises(ModelError, match="not an array of strings"):
        gguf_strings(path, "t.ints")


def test_a_cut_header_names_the_file(tmp_path):
    whole = _write(tmp_path / "m.gguf").read_bytes()
    for cut, name in ((40, "cut.gguf"), (3, "short.gguf")):
        bad = tmp_path / name
        bad.write_bytes(whole[:cut])
        with pytest.raises(ModelError, match=rf"{name}: not a readable GGUF file"):
            gguf_header(bad)
    rewritten = tmp_path / "m.gguf"  # the same path rewritten: read again, not served from the cache
    rewritten.write_bytes(whole[:60])
    with pytest.raises(ModelError):
        gguf_header(rewritten)
