"""The built native module and the layout both sides read through it."""

from __future__ import annotations

from slitter import protocol
from slitter._native import ffi, lib


def test_layout_constants():
    assert lib.SLITTER_LAYOUT_MAGIC.to_bytes(8, "little") == b"SLITTER!"
    assert lib.SLITTER_LAYOUT_VERSION == 5  # 3: the shelf; 4: no depot bitmap; 5: a consumer's two fields, the owner's nonce
    assert lib.SLITTER_SPAN_SIZE == 1 << lib.SLITTER_SPAN_SHIFT == 65536
    assert lib.SLITTER_MAX_KEYS == 1 << lib.SLITTER_KEY_BITS


def test_struct_offsets_are_the_compilers():
    assert ffi.sizeof("struct slitter_span") == 16
    assert ffi.offsetof("struct slitter_span", "obj_base") == 8
    assert ffi.offsetof("struct slitter_header", "magic") == 0
    assert ffi.offsetof("struct slitter_thread_class", "alloc") % 8 == 0
    assert ffi.sizeof("struct slitter_thread_class") >= 2 * 8 * lib.SLITTER_MAG_CAP
    assert ffi.offsetof("struct slitter_rack", "threads") % 64 == 0


def test_native_error_kinds_match_the_protocol():
    for kind, name in enumerate(protocol.ERROR_KINDS):
        assert getattr(lib, f"SLITTER_ERR_{name.upper()}") == kind
        assert protocol.ErrorCode[name.upper()] == 20 + kind
    assert lib.SLITTER_E_DOUBLE_FREE == -1 - lib.SLITTER_ERR_DOUBLE_FREE


def test_protocol_doc_names_every_op_and_error_code():
    from pathlib import Path

    doc = (Path(__file__).resolve().parent.parent / "doc" / "protocol.md").read_text()
    for op in protocol.Op:
        assert f"`{op.value}`" in doc, op
    for code in protocol.ErrorCode:
        assert f"`{code.name}`" in doc and str(int(code)) in doc, code
    for fields in protocol.REQUEST_FIELDS.values():
        for field in fields:
            assert f"`{field.name}`" in doc, field.name


def test_tests_use_the_installed_package():
    import slitter
    import slitterd

    assert "site-packages" in slitter.__file__ and "site-packages" in slitterd.__file__
