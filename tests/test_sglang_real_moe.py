"""A Qwen3-MoE's weights from the trainer reach the real SGLang server (the ``sglang`` tier) in every weight-sync mode.

One server (SGLang's CPU engine, fp32) serves a tiny Qwen3-MoE (2 layers, 4 experts, top-2). Per mode, a Megatron
model with its experts split over two expert-parallel ranks gets every parameter perturbed; the server's parameters
are reset to random values (SGLang's ``/weights_checker``), then trainer rank 0 streams the export (HF per-expert
names; the other rank's experts arrive over the EP group) into the server through an engine attached to it, as the
trainer does. The server's log-probs of prompt and response tokens then equal transformers' on the streamed weights:
a parameter the sync did not write (SGLang's loader silently skips names it does not map) would still be random, and
a server left on the previous weights is far off (checked before each sync). The server's parameter names are also
those that the contract test runs SGLang's loader against.
"""

from __future__ import annotations

import json
import urllib.request
import zlib
from pathlib import Path

import pytest
import torch

from luffy_megatron.config import SGLangConfig
from luffy_megatron.rollout.base import SamplingParams
from luffy_megatron.rollout.sglang.engine import SGLangEngine
from luffy_megatron.rollout.sglang.weights import write_hf_folder
from tests import upstream
from tests.dist_utils import run_distributed
from tests.sglang_real import cpu_server_config, free_port_block, sglang_python

pytestmark = pytest.mark.slow
PROMPTS = [[5, 6, 7, 30, 200], [9, 3, 150], [4, 4, 4, 4, 2, 77, 301]]
GREEDY = SamplingParams(n=1, temperature=0.0, max_new_tokens=8)
#: fp32 on both sides (SGLang's torch-native attention and pure-torch MoE vs transformers); the largest gap seen is
#: 9.5e-7.
LOGPROB_TOL = 1e-4
#: Before the sync the server is this far (or more) from the new weights somewhere: far outside the tolerance.
STALE_MIN = 100 * LOGPROB_TOL
EP = 2
LAYERS = 2
MODES = ("disk", "tensor", "distributed")


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory) -> Path:
    from luffy_megatron.models.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("moe") / "m", family="qwen3_moe", seed=5, layers=LAYERS)


@pytest.fixture(scope="module")
def engine(moe_dir, tmp_path_factory):
    """One real server on the tiny MoE, launched by the engine (which generates; the trainer attaches its own)."""
    cfg = cpu_server_config(sglang_python(), free_port_block())
    eng = SGLangEngine.from_config(cfg, str(moe_dir), log_dir=str(tmp_path_factory.mktemp("logs")))
    yield eng
    eng.close()


def _perturb(chunks, seed: int) -> None:
    """Add noise to every parameter, seeded by its global name (so both EP ranks change the shared ones alike)."""
    from luffy_megatron.convert.mapping import global_param_names

    with torch.no_grad():
        for chunk in chunks:
            for name, _, param in global_param_names(chunk):
                gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
                param.add_(0.05 * torch.randn(param.shape, generator=gen, dtype=param.dtype))


def _trainer_worker(rank: int, world: int, hf_dir: Path, url: str, mode: str, version: int, sync_dir: str) -> dict:
    """The trainer at EP=2: perturb, then stream the export into the server from rank 0 (every rank iterates)."""
    from luffy_megatron.convert import iter_hf_weights
    from luffy_megatron.platform import init_model_parallel, setup_platform
    from tests.fixtures_models import build_from_hf

    setup_platform()
    init_model_parallel(1, 1, ep=EP)
    spec, _, chunks = build_from_hf(hf_dir, 1, 1, expert_model_parallel_size=EP)
    _perturb(chunks, version)
    held = list(chunks[0].decoder.layers[0].mlp.local_expert_indices)
    stream = (pair for bucket in iter_hf_weights(chunks, spec, bucket_bytes=8192) for pair in bucket)
    if rank != 0:
        for _ in stream:  # the export is collective: this rank sends its experts over the EP group
            pass
        return {"held": held}
    cfg = SGLangConfig(urls=[url], weight_sync=mode, weight_sync_dir=sync_dir, weight_sync_backend="gloo")
    eng = SGLangEngine.from_config(cfg, str(hf_dir))
    eng.bucket_bytes = 20_000  # several buckets per sync
    sent: dict[str, torch.Tensor] = {}

    def tee():
        for name, t in stream:
            sent[name] = t.clone()
            yield name, t

    try:
        eng.update_weights(tee(), version=version)
    finally:
        eng.close()
    return {"held": held, "sent": sent}


def _post(url: str, path: str, body: dict) -> dict:
    req = urllib.request.Request(url + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def server_logprobs(url: str, seqs: list[list[int]]) -> list[list[float]]:
    """The server's log-prob of every token of each sequence after the first (teacher-forced prefill)."""
    out = []
    for ids in seqs:
        body = {"input_ids": ids, "sampling_params": {"max_new_tokens": 1, "temperature": 0.0}}
        body |= {"return_logprob": True, "logprob_start_len": 0}
        entries = _post(url, "/generate", body)["meta_info"]["input_token_logprobs"]
        assert len(entries) == len(ids) and entries[0][0] is None, entries[:2]
        out.append([float(e[0]) for e in entries[1:]])
    return out


@torch.no_grad()
def hf_logprobs(model: torch.nn.Module, seqs: list[list[int]]) -> list[list[float]]:
    """transformers' log-prob of every token of each sequence after the first."""
    out = []
    for ids in seqs:
        x = torch.tensor([ids])
        lp = torch.log_softmax(model(x).logits.float()[0, :-1], -1).gather(-1, x[0, 1:, None])[:, 0]
        out.append(lp.tolist())
    return out


def max_gap(a: list[list[float]], b: list[list[float]]) -> float:
    assert [len(r) for r in a] == [len(r) for r in b]
    return max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))


def test_the_server_holds_the_parameters_the_contract_test_loads_into(engine):
    """``tests/upstream.py``'s list of SGLang's Qwen3-MoE parameters (the contract test runs SGLang's loader over
    them) is what the live server holds: the names its ``/weights_checker`` reports, in order."""
    (url,) = engine.client.server_urls
    (rank,) = _post(url, "/weights_checker", {"action": "checksum"})["ranks"]
    assert list(rank["checksums"]) == upstream.sglang_qwen3_moe_params(LAYERS)


def hf_model(named: dict[str, torch.Tensor], folder: Path, hf_dir: Path) -> torch.nn.Module:
    """transformers' model of the streamed weights (written as a checkpoint and loaded, as SGLang's disk mode does)."""
    from transformers import AutoModelForCausalLM

    write_hf_folder(named.items(), folder, 1 << 30, str(hf_dir))
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.mark.parametrize("mode", MODES)
def test_every_sync_mode_brings_the_ep_trainers_experts_to_the_server(engine, moe_dir, tmp_path, mode):
    """Before the sync the server serves other weights (the previous test's or the checkpoint's), far from the new
    ones; then every server parameter is reset to random values, so that only what the sync writes is right. After
    it, prompt and response log-probs equal transformers' on the streamed weights."""
    (url,) = engine.client.server_urls
    version = 1 + MODES.index(mode)
    seqs = [p + o.output_ids for p, (o,) in zip(PROMPTS, engine.generate(PROMPTS, GREEDY))]
    before = server_logprobs(url, seqs)
    _post(url, "/weights_checker", {"action": "reset_tensors"})

    ranks = run_distributed(_trainer_worker, EP, moe_dir, url, mode, version, str(tmp_path / "sync"), timeout_s=600)
    assert [r["held"] for r in ranks] == [[0, 1], [2, 3]]  # each EP rank holds two of the four experts
    sent = ranks[0]["sent"]
    assert len([n for n in sent if ".mlp.experts." in n]) == LAYERS * 4 * 3  # every (gate, up, down), all at rank 0
    model = hf_model(sent, tmp_path / "ref", moe_dir)

    ref = hf_logprobs(model, seqs)
    gap, stale = max_gap(server_logprobs(url, seqs), ref), max_gap(before, ref)
    out = engine.generate(PROMPTS, GREEDY)  # sampled from the synced weights
    assert {o.meta["server_weight_version"] for (o,) in out} == {str(version)}
    full = hf_logprobs(model, [p + o.output_ids for p, (o,) in zip(PROMPTS, out)])
    response_gap = max_gap([o.logprobs for (o,) in out], [r[len(p) - 1 :] for p, r in zip(PROMPTS, full)])
    print(
        f"{mode}: max |log-prob diff| server vs transformers {gap:.1e} (prompt + response, teacher-forced), "
        f"{response_gap:.1e} (sampled response); {stale:.2f} before the sync"
    )
    assert gap < LOGPROB_TOL and response_gap < LOGPROB_TOL and stale > STALE_MIN, (gap, response_gap, stale)
