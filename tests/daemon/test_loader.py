"""The loader alone: real safetensors files in tmp_path, copied into real shared-memory buffers.

plan_load validates and lays out a file (raw bytes, or converted to a family's canonical
layout), fill_buffer copies it; coalesce and check_finite are pure helpers.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from loracache.daemon import loader
from loracache.daemon.files import FileIdentity, identify
from loracache.daemon.loader import LoadPlan, check_finite, coalesce, fill_buffer, plan_load
from loracache.shared.canonical import canonical_tensors
from loracache.shared.dtypes import SAFETENSORS_NAMES
from loracache.shared.errors import ErrorCode, LoraCacheError
from loracache.shared.packing import ALIGNMENT
from loracache.shared.protocol import TensorSpec
from loracache.shared.transport import Segment, open_handle
from loracache.shared.transport.shm import ShmBuffer, ShmTransport

# Sizes chosen so that most tensors need padding after them (not multiples of 256 bytes).
MIXED = {
    "a.lora_down.weight": torch.randn(4, 33, dtype=torch.float32),
    "a.lora_up.weight": torch.randn(17, 4).to(torch.bfloat16),
    "a.alpha": torch.tensor(8.0),
    "b.lora_down.weight": torch.randn(3, 5, 1, 1).half(),
    "b.lora_up.weight": torch.randn(7, 3).half(),
    "empty": torch.zeros(0, 4),
    "steps": torch.arange(5, dtype=torch.int64),
}

UNET = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
TE_Q = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
TE_OUT = "lora_te_text_model_encoder_layers_0_self_attn_out_proj"
CANON_UNET = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
CANON_TE_Q = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"


def kohya_sd_lora() -> dict[str, torch.Tensor]:
    """A tiny kohya-format SD 1.x LoRA: one UNet layer in fp32, two text-encoder layers in fp16
    (diffusers infers the text encoder's format from an ``out_proj`` layer, so two)."""
    return {
        f"{UNET}.lora_down.weight": torch.randn(2, 8),
        f"{UNET}.lora_up.weight": torch.randn(8, 2),
        f"{UNET}.alpha": torch.tensor(1.0),
        f"{TE_Q}.lora_down.weight": torch.randn(2, 8).half(),
        f"{TE_Q}.lora_up.weight": torch.randn(8, 2).half(),
        f"{TE_Q}.alpha": torch.tensor(2.0),
        f"{TE_OUT}.lora_down.weight": torch.randn(2, 8).half(),
        f"{TE_OUT}.lora_up.weight": torch.randn(8, 2).half(),
        f"{TE_OUT}.alpha": torch.tensor(2.0),
    }


# ------------------------------------------------------------------------------ helpers


@pytest.fixture
def lora_dir(tmp_path: Path) -> Path:
    directory = tmp_path.resolve() / "loras"
    directory.mkdir()
    return directory


def write(directory: Path, tensors: dict[str, torch.Tensor], name: str = "lora",
          metadata: dict[str, str] | None = None) -> FileIdentity:
    path = directory / f"{name}.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    return identify(str(path), (directory,))


def write_raw(directory: Path, header: dict, data: bytes, name: str = "raw") -> FileIdentity:
    """A hand-made file, for what safetensors itself would never write."""
    raw = json.dumps(header).encode()
    path = directory / f"{name}.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return identify(str(path), (directory,))


def planned(identity: FileIdentity, layout: str = "raw") -> LoadPlan:
    plan = plan_load(identity, layout)
    plan.file.close()
    return plan


def load(transport: ShmTransport, identity: FileIdentity, layout: str = "raw",
         name: str = "entry") -> tuple[LoadPlan, bytes]:
    """Plan, fill, and read the buffer back through the client's own mapping."""
    plan = plan_load(identity, layout)
    try:
        buffer = fill_buffer(transport, plan, name)
    finally:
        plan.file.close()
    content = open_handle(buffer.export()).numpy().tobytes()
    assert len(content) == plan.nbytes
    return plan, content


DTYPES = {name: dtype for dtype, name in SAFETENSORS_NAMES.items()}


def tensor_nbytes(spec: TensorSpec) -> int:
    return math.prod(spec.shape) * DTYPES[spec.dtype].itemsize


def tensor_at(content: bytes, spec: TensorSpec) -> torch.Tensor:
    """The tensor a client would view at ``spec`` in the buffer (a copy, to outlive it)."""
    chunk = bytearray(content[spec.offset:spec.offset + tensor_nbytes(spec)])
    if not chunk:  # frombuffer refuses an empty buffer
        return torch.empty(spec.shape, dtype=DTYPES[spec.dtype])
    flat = torch.frombuffer(chunk, dtype=torch.uint8)
    return flat.view(DTYPES[spec.dtype]).reshape(spec.shape)


def as_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def by_name(plan: LoadPlan) -> dict[str, TensorSpec]:
    return {spec.name: spec for spec in plan.layout.specs}


def buffers_left(transport: ShmTransport) -> list[str]:
    return sorted(p.name for p in transport.directory.iterdir())


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# ---------------------------------------------------------------------------- raw layout


def test_raw_layout_holds_every_tensor_of_the_file_bit_for_bit(transport, lora_dir):
    """The raw layout is the file's own tensors: names, dtypes (bf16, fp16, fp32, int64, an
    empty one), shapes and bytes, each at an aligned offset, as safetensors would load them."""
    plan, content = load(transport, write(lora_dir, MIXED))
    specs = by_name(plan)
    assert set(specs) == set(MIXED)
    assert plan.tensors == []
    reference = load_file(str(lora_dir / "lora.safetensors"))
    for name, original in MIXED.items():
        spec = specs[name]
        assert spec.dtype == SAFETENSORS_NAMES[original.dtype], name
        assert tuple(spec.shape) == tuple(original.shape), name
        assert spec.offset % ALIGNMENT == 0, name
        assert content[spec.offset:spec.offset + tensor_nbytes(spec)] == as_bytes(original), name
        got = tensor_at(content, spec)
        assert got.dtype == original.dtype and torch.equal(got, reference[name]), name


def test_raw_layout_tensors_do_not_overlap_and_fit_the_buffer(lora_dir):
    """Each tensor has its own bytes in the buffer, and the buffer is sized to the last one,
    rounded up to the alignment (what the budget counts)."""
    plan = planned(write(lora_dir, MIXED))
    spans = sorted((s.offset, s.offset + tensor_nbytes(s)) for s in plan.layout.specs)
    assert all(end <= nxt for (_, end), (nxt, _) in zip(spans, spans[1:]))
    assert plan.nbytes == plan.layout.nbytes
    assert plan.nbytes % ALIGNMENT == 0
    assert spans[-1][1] <= plan.nbytes < spans[-1][1] + ALIGNMENT


def test_raw_segments_cover_each_tensor_once(lora_dir):
    """Copies move exactly the tensor bytes: as many bytes as the file's tensors hold."""
    plan = planned(write(lora_dir, MIXED))
    total = sum(t.numel() * t.element_size() for t in MIXED.values())
    assert sum(s.nbytes for s in plan.segments) == total
    assert len(plan.segments) <= len(MIXED)


def test_aligned_tensors_are_copied_in_one_segment(lora_dir):
    """Tensors whose sizes are multiples of the alignment lie back to back both in the file and
    in the buffer: a miss is one copy, not one per tensor."""
    tensors = {f"layer{i}.lora_down.weight": torch.randn(64) for i in range(4)}  # 256 B each
    identity = write(lora_dir, tensors)
    plan = planned(identity)
    with open(identity.path, "rb") as f:
        data_start = 8 + struct.unpack("<Q", f.read(8))[0]
    assert plan.segments == [Segment(src=data_start, dst=0, nbytes=4 * 256)]


def test_raw_layout_skips_gaps_and_trailing_bytes_of_the_file(transport, lora_dir):
    """Our header reader tolerates a gap between tensors and bytes after the last one (the raw
    layout never reads them); only the tensors' bytes reach the buffer."""
    a, b = torch.arange(6, dtype=torch.float32), torch.arange(3, dtype=torch.int16)
    data = a.numpy().tobytes() + b"\xee" * 10 + b.numpy().tobytes() + b"\xff" * 5
    header = {"a": {"dtype": "F32", "shape": [6], "data_offsets": [0, 24]},
              "b": {"dtype": "I16", "shape": [3], "data_offsets": [34, 40]}}
    plan, content = load(transport, write_raw(lora_dir, header, data))
    specs = by_name(plan)
    assert torch.equal(tensor_at(content, specs["a"]), a)
    assert torch.equal(tensor_at(content, specs["b"]), b)
    assert len(plan.segments) == 2  # the gap is not copied
    assert b"\xee" not in content and b"\xff" not in content


def test_raw_layout_does_not_check_values(transport, lora_dir):
    """The raw layout never brings the data into Python, so NaN passes (documented)."""
    plan, content = load(transport, write(lora_dir, {"x": torch.tensor([1.0, float("nan")])}))
    assert torch.isnan(tensor_at(content, plan.layout.specs[0])).any()


def test_plan_leaves_the_file_open_for_fill(lora_dir):
    """The caller fills from the plan's open file, then closes it."""
    plan = plan_load(write(lora_dir, MIXED), "raw")
    try:
        assert not plan.file.closed
        assert plan.path == str(lora_dir / "lora.safetensors")
    finally:
        plan.file.close()


def test_buffer_is_named_by_the_caller(transport, lora_dir):
    """The name becomes the shared-memory file clients map (one per entry)."""
    plan = plan_load(write(lora_dir, MIXED), "raw")
    try:
        buffer = fill_buffer(transport, plan, "entry-42")
    finally:
        plan.file.close()
    assert isinstance(buffer, ShmBuffer)
    assert buffers_left(transport) == ["entry-42.bin"]
    assert buffer.nbytes == plan.nbytes


# ---------------------------------------------------------------------- converted layout


def test_sd_layout_converts_a_kohya_file_to_canonical_names(transport, lora_dir):
    """A kohya SD LoRA leased as "sd" arrives under canonical names, with its values and dtypes
    (fp32 UNet, fp16 text encoder) kept and alphas as 0-dim float32."""
    source = kohya_sd_lora()
    plan, content = load(transport, write(lora_dir, source), layout="sd")
    assert plan.segments == []
    got = {spec.name: tensor_at(content, spec) for spec in plan.layout.specs}
    assert set(got) == {f"{module}{suffix}" for module in
                        (CANON_UNET, CANON_TE_Q,
                         "text_encoder.text_model.encoder.layers.0.self_attn.out_proj")
                        for suffix in (".lora_down.weight", ".lora_up.weight", ".alpha")}
    assert torch.equal(got[f"{CANON_UNET}.lora_down.weight"], source[f"{UNET}.lora_down.weight"])
    assert torch.equal(got[f"{CANON_UNET}.lora_up.weight"], source[f"{UNET}.lora_up.weight"])
    assert got[f"{CANON_TE_Q}.lora_up.weight"].dtype == torch.float16
    assert torch.equal(got[f"{CANON_TE_Q}.lora_up.weight"], source[f"{TE_Q}.lora_up.weight"])
    assert got[f"{CANON_UNET}.alpha"].shape == ()
    assert got[f"{CANON_UNET}.alpha"].dtype == torch.float32
    assert got[f"{CANON_UNET}.alpha"].item() == 1.0
    assert got[f"{CANON_TE_Q}.alpha"].item() == 2.0
    assert all(spec.offset % ALIGNMENT == 0 for spec in plan.layout.specs)


def test_converted_layout_matches_the_shared_converter(transport, lora_dir):
    """The daemon's "sd" buffer holds exactly what a worker converting the file itself gets
    (the fallback path uses canonical_tensors on the loaded file)."""
    identity = write(lora_dir, kohya_sd_lora())
    plan, content = load(transport, identity, layout="sd")
    expected = canonical_tensors(load_file(identity.path), "sd")
    got = {spec.name: tensor_at(content, spec) for spec in plan.layout.specs}
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype, name
        assert torch.equal(got[name], tensor), name


def test_cast_layout_holds_the_factors_in_that_dtype_and_alphas_in_float32(transport, lora_dir):
    """"sd:BF16" is the "sd" layout with every factor cast (a bf16 pipeline uses it as is)."""
    identity = write(lora_dir, kohya_sd_lora())
    sd_plan, sd = load(transport, identity, "sd", name="sd")
    plan, cast = load(transport, identity, "sd:BF16", name="cast")
    plain = {name: tensor_at(sd, spec) for name, spec in by_name(sd_plan).items()}
    got = {name: tensor_at(cast, spec) for name, spec in by_name(plan).items()}
    assert got.keys() == plain.keys()
    for name, tensor in plain.items():
        if name.endswith(".alpha"):
            assert got[name].dtype == torch.float32 and torch.equal(got[name], tensor)
        else:
            assert got[name].dtype == torch.bfloat16
            assert torch.equal(got[name], tensor.to(torch.bfloat16)), name


def test_a_cast_that_overflows_is_an_invalid_lora(lora_dir):
    tensors = kohya_sd_lora()
    tensors[f"{UNET}.lora_up.weight"][0, 0] = 1e6  # fine in float32, Inf in float16
    identity = write(lora_dir, tensors)
    planned(identity, "sd")  # uncast, it loads
    with pytest.raises(LoraCacheError) as error:
        plan_load(identity, "sd:F16")
    assert error.value.code is ErrorCode.INVALID_LORA
    assert "beyond F16's range" in error.value.message and "'sd'" in error.value.message


@pytest.mark.parametrize("layout", ["raw:F16", "sd:F8_E4M3", "sd:", "sd:f16", "sdxl:F16:F32"])
def test_unknown_layouts_are_bad_requests_naming_the_accepted_ones(lora_dir, layout):
    with pytest.raises(LoraCacheError) as error:
        plan_load(write(lora_dir, kohya_sd_lora()), layout)
    assert error.value.code is ErrorCode.BAD_REQUEST
    assert "sdxl:F16" in error.value.message and "BF16" in error.value.message


def test_same_file_raw_and_converted_differ_only_in_names(transport, lora_dir):
    """Raw keeps the file's kohya keys; the family layout renames them, same factor bytes."""
    identity = write(lora_dir, kohya_sd_lora())
    raw_plan, raw = load(transport, identity, "raw", name="raw")
    sd_plan, sd = load(transport, identity, "sd", name="sd")
    assert {s.name for s in raw_plan.layout.specs} == set(kohya_sd_lora())
    raw_spec = by_name(raw_plan)[f"{UNET}.lora_down.weight"]
    sd_spec = by_name(sd_plan)[f"{CANON_UNET}.lora_down.weight"]
    assert torch.equal(tensor_at(raw, raw_spec), tensor_at(sd, sd_spec))
    assert buffers_left(transport) == ["raw.bin", "sd.bin"]


def test_converted_layout_takes_alphas_from_the_file_metadata(lora_dir):
    """A diffusers/PEFT file stores its LoraConfig in the safetensors metadata; the loader
    passes the metadata on, so those alphas win."""
    tensors = {f"{CANON_UNET}.lora_A.weight": torch.randn(2, 8),
               f"{CANON_UNET}.lora_B.weight": torch.randn(8, 2)}
    metadata = {"lora_adapter_metadata": json.dumps({"unet.r": 2, "unet.lora_alpha": 8})}
    plan = planned(write(lora_dir, tensors, metadata=metadata), "sd")
    names = {spec.offset: spec.name for spec in plan.layout.specs}
    converted = {names[offset]: tensor for offset, tensor in plan.tensors}
    assert converted.keys() == {f"{CANON_UNET}.lora_down.weight", f"{CANON_UNET}.lora_up.weight",
                                f"{CANON_UNET}.alpha"}
    assert converted[f"{CANON_UNET}.alpha"].item() == 8.0


def test_converted_layout_refuses_nan_naming_the_tensor(lora_dir):
    """Family layouts check values: a NaN would poison every weight the LoRA is fused into."""
    source = kohya_sd_lora()
    source[f"{TE_Q}.lora_up.weight"][3, 1] = float("inf")
    identity = write(lora_dir, source)
    with pytest.raises(LoraCacheError) as caught:
        plan_load(identity, "sd")
    assert caught.value.code is ErrorCode.INVALID_LORA
    assert f"'{TE_Q}.lora_up.weight'" in caught.value.message
    assert identity.path in caught.value.message


def test_converted_layout_refuses_what_safetensors_refuses(lora_dir):
    """Trailing bytes pass our header reader but not safetensors: INVALID_LORA, not a crash."""
    identity = write(lora_dir, kohya_sd_lora())
    with open(identity.path, "ab") as f:
        f.write(b"\0" * 7)
    identity = identify(identity.path, (lora_dir,))
    planned(identity, "raw")  # the raw layout copies tensors only: fine
    with pytest.raises(LoraCacheError) as caught:
        plan_load(identity, "sd")
    assert caught.value.code is ErrorCode.INVALID_LORA
    assert "safetensors refuses" in caught.value.message


def test_converted_layout_refuses_a_file_that_is_no_lora_for_the_family(lora_dir):
    """Tensors that name no LoRA layer of the family: UNSUPPORTED_FORMAT, never an empty entry."""
    with pytest.raises(LoraCacheError) as caught:
        plan_load(write(lora_dir, {"weights": torch.randn(4, 4)}), "sd")
    assert caught.value.code is ErrorCode.UNSUPPORTED_FORMAT


def test_unknown_layout_is_a_bad_request(lora_dir):
    with pytest.raises(LoraCacheError) as caught:
        plan_load(write(lora_dir, MIXED), "sdxl-turbo")
    assert caught.value.code is ErrorCode.BAD_REQUEST
    assert "sdxl-turbo" in caught.value.message and "raw" in caught.value.message


# --------------------------------------------------------------------------- load errors


BAD_FILES = {
    "too short": b"\x01\x02\x03",
    "header past the end": struct.pack("<Q", 1000) + b"{}",
    "header not json": struct.pack("<Q", 5) + b"{nope",
    "no tensors": struct.pack("<Q", 2) + b"{}",
}


@pytest.mark.parametrize("layout", ["raw", "sd"])
@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_header_is_invalid_lora_naming_the_file_and_leaks_no_fd(lora_dir, case, layout):
    """Every malformed header is INVALID_LORA with the path, and the opened file is closed."""
    path = lora_dir / "bad.safetensors"
    path.write_bytes(BAD_FILES[case])
    identity = identify(str(path), (lora_dir,))
    before = open_fds()
    with pytest.raises(LoraCacheError) as caught:
        plan_load(identity, layout)
    assert caught.value.code is ErrorCode.INVALID_LORA
    assert str(path) in caught.value.message
    assert open_fds() == before


def test_file_truncated_before_load_is_invalid_lora(lora_dir):
    """A header whose tensors run past the end of the file: truncated, refused at plan time."""
    identity = write(lora_dir, MIXED)
    os.truncate(identity.path, identity.size - 10)
    identity = identify(identity.path, (lora_dir,))
    with pytest.raises(LoraCacheError) as caught:
        plan_load(identity, "raw")
    assert caught.value.code is ErrorCode.INVALID_LORA
    assert "truncated" in caught.value.message


def test_file_truncated_between_plan_and_fill_is_invalid_lora_and_frees_the_buffer(
        transport, lora_dir):
    """The file is read through the descriptor opened at plan time; cut short before the copy,
    fill_buffer names the file, says INVALID_LORA and leaves no buffer behind."""
    identity = write(lora_dir, MIXED)
    plan = plan_load(identity, "raw")
    try:
        os.truncate(identity.path, identity.size // 2)
        with pytest.raises(LoraCacheError) as caught:
            fill_buffer(transport, plan, "entry")
    finally:
        plan.file.close()
    assert caught.value.code is ErrorCode.INVALID_LORA
    assert caught.value.message.startswith(identity.path + ":")
    assert "truncated" in caught.value.message
    assert buffers_left(transport) == []


def test_file_rewritten_after_identify_is_not_found(lora_dir):
    """The identity (inode, size, mtime) is checked on the opened descriptor: a file rewritten
    since it was identified is refused with NOT_FOUND ("retry"), never loaded as the old one."""
    identity = write(lora_dir, MIXED)
    write(lora_dir, {**MIXED, "extra": torch.ones(3)})  # same path, new contents
    before = open_fds()
    with pytest.raises(LoraCacheError) as caught:
        plan_load(identity, "raw")
    assert caught.value.code is ErrorCode.NOT_FOUND
    assert "changed" in caught.value.message
    assert open_fds() == before


def test_file_replaced_with_same_size_and_time_is_not_found(lora_dir):
    """A new inode under the path (atomic rename) is another file, even with equal size and
    mtime."""
    identity = write(lora_dir, MIXED)
    other = lora_dir / "other.safetensors"
    shutil.copyfile(identity.path, other)
    os.utime(other, ns=(identity.mtime_ns, identity.mtime_ns))
    os.replace(other, identity.path)
    with pytest.raises(LoraCacheError) as caught:
        plan_load(identity, "raw")
    assert caught.value.code is ErrorCode.NOT_FOUND


def test_file_removed_after_identify_is_not_found(lora_dir):
    identity = write(lora_dir, MIXED)
    os.unlink(identity.path)
    with pytest.raises(LoraCacheError) as caught:
        plan_load(identity, "raw")
    assert caught.value.code is ErrorCode.NOT_FOUND
    assert identity.path in caught.value.message


def test_file_swapped_for_a_symlink_is_not_followed(lora_dir):
    """O_NOFOLLOW: a symlink put in place after the checks cannot redirect the read."""
    identity = write(lora_dir, MIXED)
    target = lora_dir / "elsewhere.bin"
    os.replace(identity.path, target)
    os.symlink(target, identity.path)
    with pytest.raises(LoraCacheError) as caught:
        plan_load(identity, "raw")
    assert caught.value.code is ErrorCode.NOT_FOUND


@pytest.mark.timeout(10)
def test_file_swapped_for_a_fifo_does_not_hang(lora_dir):
    """O_NONBLOCK: opening a FIFO with no writer returns at once, and the identity check
    refuses it."""
    identity = write(lora_dir, MIXED)
    os.unlink(identity.path)
    os.mkfifo(identity.path)
    with pytest.raises(LoraCacheError) as caught:
        plan_load(identity, "raw")
    assert caught.value.code is ErrorCode.NOT_FOUND


# --------------------------------------------------------------------------- check_finite


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_check_finite_refuses_nan_and_inf(dtype, bad):
    tensor = torch.ones(5, 3, dtype=dtype)
    tensor[4, 2] = bad
    with pytest.raises(LoraCacheError) as caught:
        check_finite("/loras/x.safetensors", [("ok", torch.ones(2)), ("bad.weight", tensor)])
    assert caught.value.code is ErrorCode.INVALID_LORA
    assert caught.value.message.startswith("/loras/x.safetensors: tensor 'bad.weight'")


def test_check_finite_names_the_first_bad_tensor():
    nan = torch.tensor([float("nan")])
    with pytest.raises(LoraCacheError) as caught:
        check_finite("f", [("first", nan), ("second", nan)])
    assert "'first'" in caught.value.message and "second" not in caught.value.message


def test_check_finite_accepts_finite_integer_and_empty_tensors():
    """Integers have no NaN; extremes of a float type are finite; empty tensors have nothing."""
    check_finite("f", [
        ("big", torch.tensor([torch.finfo(torch.float16).max], dtype=torch.float16)),
        ("tiny", torch.tensor([torch.finfo(torch.float32).tiny / 2])),  # subnormal
        ("ints", torch.arange(10)),
        ("flags", torch.tensor([True, False])),
        ("empty", torch.empty(0, 3)),
    ])


def test_check_finite_skips_float8():
    """float8 has no isfinite kernel on every device: documented as not checked."""
    check_finite("f", [("f8", torch.tensor([float("nan")]).to(torch.float8_e5m2))])


def test_check_finite_finds_nan_in_any_chunk(monkeypatch):
    """Big tensors are checked in chunks; a NaN in the last, partial chunk still counts."""
    monkeypatch.setattr(loader, "FINITE_CHUNK", 4)
    tensor = torch.zeros(3, 5)  # 15 elements: chunks of 4, 4, 4, 3
    check_finite("f", [("clean", tensor)])
    tensor[2, 4] = float("nan")
    with pytest.raises(LoraCacheError):
        check_finite("f", [("dirty", tensor)])


def test_check_finite_handles_non_contiguous_tensors():
    tensor = torch.ones(4, 6)
    tensor[1, 0] = float("inf")
    with pytest.raises(LoraCacheError):
        check_finite("f", [("t", tensor.t())])


# ------------------------------------------------------------------------------- coalesce


def test_coalesce_of_nothing_is_nothing():
    assert coalesce([]) == []


def test_coalesce_merges_segments_adjacent_in_file_and_buffer():
    segments = [Segment(100, 0, 256), Segment(356, 256, 256), Segment(612, 512, 10)]
    assert coalesce(segments) == [Segment(100, 0, 522)]


def test_coalesce_keeps_segments_apart_when_the_buffer_has_padding():
    """Adjacent in the file, but the next tensor starts at the next aligned offset."""
    segments = [Segment(100, 0, 10), Segment(110, 256, 10)]
    assert coalesce(segments) == segments


def test_coalesce_keeps_segments_apart_when_the_file_has_a_gap():
    segments = [Segment(100, 0, 256), Segment(400, 256, 16)]
    assert coalesce(segments) == segments


def test_coalesce_never_merges_overlapping_or_backward_segments():
    overlapping = [Segment(0, 0, 100), Segment(50, 100, 100)]
    backward = [Segment(100, 100, 100), Segment(0, 0, 100)]
    assert coalesce(overlapping) == overlapping
    assert coalesce(backward) == backward


def test_coalesce_merges_runs_and_keeps_breaks():
    segments = [Segment(0, 0, 256), Segment(256, 256, 256),  # a run
                Segment(600, 512, 8),  # gap in the file
                Segment(608, 520, 8), Segment(616, 528, 0),  # a run, with an empty tensor
                Segment(616, 768, 4)]  # padding in the buffer
    assert coalesce(segments) == [Segment(0, 0, 512), Segment(600, 512, 16), Segment(616, 768, 4)]


def test_coalesce_leaves_its_input_alone():
    segments = [Segment(0, 0, 4), Segment(4, 4, 4)]
    coalesce(segments)
    assert segments == [Segment(0, 0, 4), Segment(4, 4, 4)]


@st.composite
def segment_lists(draw) -> list[Segment]:
    """Segments as plan_load makes them: increasing in file and buffer, random gaps."""
    segments, src, dst = [], draw(st.integers(0, 64)), 0
    for _ in range(draw(st.integers(0, 8))):
        nbytes = draw(st.integers(0, 40))
        segments.append(Segment(src, dst, nbytes))
        src += nbytes + draw(st.sampled_from([0, 0, 3]))
        dst += nbytes + draw(st.sampled_from([0, 0, 5]))
    return segments


def byte_map(segments: list[Segment]) -> set[tuple[int, int]]:
    return {(s.src + i, s.dst + i) for s in segments for i in range(s.nbytes)}


@settings(max_examples=60, deadline=None)
@given(segment_lists())
def test_coalesce_copies_the_same_bytes_to_the_same_places(segments):
    """Whatever it merges, every file byte still goes where it went, and nothing mergeable is
    left side by side."""
    merged = coalesce(segments)
    assert byte_map(merged) == byte_map(segments)
    assert sum(s.nbytes for s in merged) == sum(s.nbytes for s in segments)
    for a, b in zip(merged, merged[1:]):
        assert not (a.src + a.nbytes == b.src and a.dst + a.nbytes == b.dst)
