"""The sbatch scripts on a real Slurm cluster started on this machine (tests/slurm_cluster.py; installs Slurm when
missing, needs root). The tiny CPU example trains two steps with TP 2 under ``sbatch --wait``; a configuration error
fails the job with the key named in its output; run_7b.sh and run_32b.sh run for real (their own #SBATCH headers) on
simulated 8-GPU nodes with a stub ``$PYTHON`` that records on which node, with which GPUs, arguments and API key each
SGLang server and trainer was started: the trainer, its config resolved from that command line, attaches to exactly
the servers started, at their TP. eval.sh runs the same way with luffy-eval stubbed. Each job makes its own key, which
its servers demand and which is never printed. All jobs are submitted at once and run side by side. Nothing here needs
a GPU.
A machine that cannot run Slurm skips these tests as the ``slurm`` tier (tests/tiers.py); CI requires them."""

from __future__ import annotations

import json
import math
import re
import shlex
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from luffy_megatron.config import SGLangConfig, load_config
from luffy_megatron.rollout.sglang.launcher import launch_servers, stop_processes
from luffy_megatron.train.cli import parse_args
from tests.dist_utils import free_port
from tests.fixtures_models import save_tiny_model, write_train_assets
from tests.learning import assert_learns
from tests.sglang_real import cpu_server_config, free_port_block, sglang_python
from tests.slurm_cluster import require_slurm

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
MODEL_PATH = "/models/stub-model"
# The jobs of the examples that start SGLang servers for a trainer (launch_rollout_servers of slurm_common.sh).
TRAINER_SERVER_JOBS = {"7b": "run_7b.sh", "7b_restart": "run_7b.sh", "32b": "run_32b.sh", "32b_long": "run_32b.sh"}
# The configs run_32b.sh is submitted with: the 32B recipe and its long-response variant.
RUN_32B_CONFIGS = {"32b": "configs/luffy_qwen2.5_32b.yaml", "32b_long": "configs/luffy_qwen2.5_32b_long.yaml"}

STUB = """#!/usr/bin/env bash
# Stands in for $PYTHON: records how it was started (node, GPUs, API key, arguments). Servers are recorded as server.*
# and run until the job ends (with STUB_SERVERS_DIE_ONCE, each port's first one exits at once), trainers
# (-m torch.distributed.run) as trainer.*: they wait for the expected number of server starts; luffy-eval as eval.*.
role=server
[[ ${2:-} == torch.distributed.run ]] && role=trainer
[[ ${2:-} == luffy_megatron.eval.cli ]] && role=eval
f="$STUB_LOG_DIR/$role.${SLURMD_NODENAME:-none}.$$"
{ echo "node=${SLURMD_NODENAME:-}"; echo "cuda=${CUDA_VISIBLE_DEVICES-unset}"; echo "key=${SGLANG_API_KEY-unset}"
  printf 'arg=%s\\n' "$@"; } > "$f.tmp"
mv "$f.tmp" "$f"
if [[ $role == server ]]; then
    port=$(printf '%s\n' "$@" | grep -A1 -x -- --port | tail -n 1)
    if [[ -n ${STUB_SERVERS_DIE_ONCE:-} ]] && mkdir "$STUB_LOG_DIR/died.$port" 2>/dev/null; then
        exit 1
    fi
    exec sleep 600
fi
if [[ $role == trainer ]]; then
    for _ in $(seq 300); do
        [[ $(find "$STUB_LOG_DIR" -name 'server.*' ! -name '*.tmp' | wc -l) -ge $STUB_SERVERS ]] && break
        sleep 0.1
    done
fi
"""


@pytest.fixture(scope="module")
def cluster():
    with require_slurm(cpus=4, gpu_nodes=4) as c:
        yield c


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return write_train_assets(tmp_path_factory.mktemp("slurm_assets"))


def tiny_overrides(assets: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"model.hf_path={assets / 'model'}",
        "model.dtype=float32",
        f"data.train_files=[{assets / 'task' / 'train.parquet'}]",
        "data.val_files=[]",
        "trainer.val_interval=0",
        "data.train_batch_size=4",
        "data.mini_batch_size=4",
        "data.max_response_length=28",  # the fixture's expert traces (27 tokens and EOS) fit: the run learns
        "data.max_prompt_length=32",
        "rollout.n=4",
        "rollout.hf_batch_size=16",
        "reward.num_workers=1",
        f"logging.out_dir={out}",
        *extra,
    ]


def job_env(cluster, **extra: str) -> dict[str, str]:
    """The job's environment: sbatch exports it (SLURM_CONF included); PYTHON is this interpreter."""
    return cluster.env(**{"PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port()), **extra})


def job_output(info: dict[str, str]) -> str:
    path = Path(info["StdOut"])
    return path.read_text(errors="replace") if path.is_file() else f"(no output file {path})"


def submit_gpu_script(cluster, root: Path, script: str, servers: int, *args: str, **extra_env: str):
    """An examples/ GPU script, unchanged (its own #SBATCH header), on the simulated GPU partition with $PYTHON a
    stub that records each SGLang server and trainer it stands in for."""
    bin_dir, log_dir = write_stubs(root)
    env = job_env(
        cluster,
        MODEL_PATH=MODEL_PATH,
        STUB_LOG_DIR=str(log_dir),
        STUB_SERVERS=str(servers),
        PYTHON=str(bin_dir / "python"),
        **extra_env,
    )
    env.pop("SGLANG_API_KEY", None)  # the scripts make one
    return cluster.submit(EXAMPLES / script, *args, cwd=root, env=env, options=("--partition=gpu",)), log_dir


@pytest.fixture(scope="module")
def jobs(cluster, assets, tmp_path_factory):
    """Every job, submitted at once so they run side by side: the tiny CPU example twice on the host node (4 CPUs,
    2 each; a good run and one with ``parallel.tp=3``), then run_7b.sh, run_32b.sh (the 32B recipe, then its
    long-response variant) and eval.sh (at TP 1 and 2) on the GPU partition."""
    root = tmp_path_factory.mktemp("jobs")
    tiny = EXAMPLES / "run_tiny_cpu_slurm.sh"
    tiny_options = (f"--output={root}/%x-%j.out",)
    procs = {
        "good": cluster.submit(
            tiny,
            "configs/tiny_cpu_luffy.yaml",
            *tiny_overrides(assets, root / "good"),
            cwd=ROOT,
            env=job_env(cluster),
            options=tiny_options,
        ),
        "bad": cluster.submit(  # no CONFIG argument: the default one
            tiny,
            *tiny_overrides(assets, root / "bad", "parallel.tp=3"),
            cwd=ROOT,
            env=job_env(cluster),
            options=tiny_options,
        ),
    }
    calls = {}
    (root / "7b").mkdir()
    procs["7b"], calls["7b"] = submit_gpu_script(cluster, root / "7b", "run_7b.sh", 4, "trainer.total_steps=3")
    (root / "7b_restart").mkdir()  # every server exits once: the script starts each again (8 starts in all)
    procs["7b_restart"], calls["7b_restart"] = submit_gpu_script(
        cluster, root / "7b_restart", "run_7b.sh", 8, STUB_SERVERS_DIE_ONCE="1", SERVER_RESTART_DELAY="1"
    )
    for name, config in RUN_32B_CONFIGS.items():  # 4 nodes each: the second job starts when the first ends
        (root / name).mkdir()
        procs[name], calls[name] = submit_gpu_script(
            cluster, root / name, "run_32b.sh", 4, config, "data.train_files=[/data/a b.parquet]"
        )
    for name, env in (("eval", {}), ("eval_tp2", {"EVAL_TP": "2"})):
        (root / name).mkdir()
        procs[name], calls[name] = submit_gpu_script(cluster, root / name, "eval.sh", 0, **env)
    results = {}
    for name, proc in procs.items():
        job_id, rc, info = cluster.finish(proc, timeout=420)
        results[name] = {"rc": rc, "info": info, "log": job_output(info), "out": root / name}
        if name in calls:
            results[name]["servers"] = read_calls(calls[name], "server")
            results[name]["trainers"] = read_calls(calls[name], "trainer")
            results[name]["evals"] = read_calls(calls[name], "eval")
    return results


def test_tiny_cpu_example_trains_two_steps_with_tp2(cluster, jobs):
    from luffy_megatron.metrics.logger import read_jsonl

    job = jobs["good"]
    info, log = job["info"], job["log"]
    assert job["rc"] == 0, f"sbatch --wait exit {job['rc']}\n{info}\n{log[-4000:]}\n{cluster.logs()}"
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", info
    assert info["NumTasks"] == "1" and info["NumCPUs"] == "2", info
    assert f"on {cluster.host_node}, 2 processes" in log, log[-2000:]
    rows = {r["step"]: r for r in read_jsonl(job["out"] / "metrics.jsonl")}
    assert sorted(rows) == [1, 2], log[-3000:]
    for row in rows.values():
        assert math.isfinite(row["actor/loss"]) and math.isfinite(row["actor/entropy"]), row
    assert_learns(rows.values(), most=1.0)


def test_config_error_fails_the_job_and_names_the_key(jobs):
    job = jobs["bad"]
    info, log = job["info"], job["log"]
    assert job["rc"] != 0, f"a job with parallel.tp=3 succeeded\n{log[-3000:]}"
    assert info["JobState"] == "FAILED" and info["ExitCode"] != "0:0", info
    assert "configuration error" in log and "parallel.tp" in log and "does not divide" in log, log[-3000:]
    assert not (job["out"] / "metrics.jsonl").exists()


def write_stubs(tmp_path: Path) -> tuple[Path, Path]:
    bin_dir, log_dir = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    log_dir.mkdir()
    (bin_dir / "python").write_text(STUB)
    (bin_dir / "python").chmod(0o755)
    return bin_dir, log_dir


def read_calls(log_dir: Path, program: str) -> list[dict]:
    calls = []
    for path in sorted(log_dir.glob(f"{program}.*")):
        if path.suffix == ".tmp":
            continue
        lines = path.read_text().splitlines()
        calls.append(
            {
                "node": lines[0].removeprefix("node="),
                "cuda": lines[1].removeprefix("cuda="),
                "key": lines[2].removeprefix("key="),
                "args": [a.removeprefix("arg=") for a in lines[3:]],
            }
        )
    return calls


def arg_after(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def gpu_job(cluster, jobs, name: str) -> tuple[dict, list, list]:
    job = jobs[name]
    info = job["info"]
    assert job["rc"] == 0 and info["JobState"] == "COMPLETED", f"{info}\n{job['log']}\n{cluster.logs()}"
    assert Path(info["StdOut"]).is_file(), f"no job output {info['StdOut']}"
    return info, job["servers"], job["trainers"]


def test_run_7b_places_servers_and_trainer(cluster, jobs):
    info, servers, trainers = gpu_job(cluster, jobs, "7b")
    nodes = cluster.run("scontrol", "show", "hostnames", info["NodeList"]).stdout.split()
    assert len(nodes) == 2 and info["NumCPUs"] == "128", info
    train_node, rollout_node = nodes
    assert len(servers) == 4, servers
    urls = []
    for s in sorted(servers, key=lambda s: int(arg_after(s["args"], "--port"))):
        assert s["node"] == rollout_node and s["args"][:2] == ["-m", "sglang.launch_server"], s
        assert arg_after(s["args"], "--tp-size") == "2" and arg_after(s["args"], "--model-path") == MODEL_PATH, s
        assert arg_after(s["args"], "--host") == rollout_node, s
        urls.append(f"http://{rollout_node}:{arg_after(s['args'], '--port')}")
    assert sorted(s["cuda"] for s in servers) == ["0,1", "2,3", "4,5", "6,7"], "each server on its own 2 GPUs"
    [trainer] = trainers
    args = trainer["args"]
    assert trainer["node"] == train_node and trainer["cuda"] == "0,1,2,3,4,5,6,7", trainer
    assert arg_after(args, "--nproc-per-node") == "8" and arg_after(args, "--master-addr") == train_node, args
    assert arg_after(args, "--nnodes") == "1", args
    cli = args.index("luffy_megatron.train.cli")
    assert args[cli - 1] == "-m" and args[cli + 1] == "configs/luffy_qwen2.5_math_7b.yaml", args
    assert f"model.hf_path={MODEL_PATH}" in args and "rollout.sglang.launch=false" in args, args
    assert f"rollout.sglang.urls=[{','.join(sorted(urls))}]" in args, args
    assert args[-1] == "trainer.total_steps=3", args


@pytest.mark.parametrize("name", sorted(RUN_32B_CONFIGS))
def test_run_32b_places_servers_and_two_trainer_nodes(cluster, jobs, name):
    info, servers, trainers = gpu_job(cluster, jobs, name)
    nodes = cluster.run("scontrol", "show", "hostnames", info["NodeList"]).stdout.split()
    assert len(nodes) == 4, info
    by_node: dict[str, list[str]] = {}
    for s in servers:
        assert arg_after(s["args"], "--tp-size") == "4", s
        by_node.setdefault(s["node"], []).append(s["cuda"])
    assert {n: sorted(c) for n, c in by_node.items()} == {n: ["0,1,2,3", "4,5,6,7"] for n in nodes[2:]}, by_node
    assert sorted(t["node"] for t in trainers) == sorted(nodes[:2]), trainers
    ranks = []
    for t in trainers:
        args = t["args"]
        assert arg_after(args, "--nnodes") == "2" and arg_after(args, "--nproc-per-node") == "8", args
        assert arg_after(args, "--master-addr") == nodes[0], args
        assert arg_after(args, "luffy_megatron.train.cli") == RUN_32B_CONFIGS[name], args
        ranks.append(arg_after(args, "--node-rank"))
        urls = [a for a in args if a.startswith("rollout.sglang.urls=")]
        assert len(urls) == 1 and urls[0].count("http://") == 4, args
        assert args[-1] == "data.train_files=[/data/a b.parquet]", f"an override with a space: {shlex.join(args)}"
    assert sorted(ranks) == ["0", "1"], trainers


def trainer_sglang(trainer: dict) -> SGLangConfig:
    """The trainer's rollout.sglang as luffy_megatron.train.cli resolves its recorded command line (the config of this
    checkout, then the overrides)."""
    args = trainer["args"]
    cli = parse_args(args[args.index("luffy_megatron.train.cli") + 1 :])
    return load_config(ROOT / cli.config, cli.overrides).rollout.sglang


@pytest.mark.parametrize("name", sorted(TRAINER_SERVER_JOBS))
def test_trainer_and_servers_agree_on_tp_and_gpus(cluster, jobs, name):
    """The trainer's weight-update group holds its rank 0 and, for TP rank r of server URL i, rank
    1 + i x rollout.sglang.tp_size + r (DistributedSync.init). So every server must run at the TP of the
    trainer's resolved config, the trainer must attach to exactly the servers started (and launch none), and URLs x TP
    must be the GPUs those servers occupy, each GPU once."""
    _, servers, trainers = gpu_job(cluster, jobs, name)
    started: dict[str, tuple[str, str]] = {}  # URL -> (node, GPUs); a restarted server comes back on the same ones
    for s in servers:
        url = f"http://{arg_after(s['args'], '--host')}:{arg_after(s['args'], '--port')}"
        assert started.setdefault(url, (s["node"], s["cuda"])) == (s["node"], s["cuda"]), (url, servers)
    gpus = [(node, gpu) for node, cuda in started.values() for gpu in cuda.split(",")]
    tps = {arg_after(s["args"], "--tp-size") for s in servers}
    assert trainers, name
    for t in trainers:
        sglang = trainer_sglang(t)
        assert not sglang.launch and sorted(sglang.urls) == sorted(started), (sglang, started)
        assert tps == {str(sglang.tp_size)}, f"servers at TP {tps}, trainer rollout.sglang.tp_size={sglang.tp_size}"
        assert len(sglang.urls) * sglang.tp_size == len(gpus) == len(set(gpus)), (sglang, started)


def test_every_example_that_starts_servers_is_checked():
    """A new script that starts servers needs a job above and its place in TRAINER_SERVER_JOBS (or beside eval.sh)."""
    scripts = {p.name: p.read_text() for p in EXAMPLES.glob("*.sh") if p.name != "slurm_common.sh"}
    starts = {name for name, text in scripts.items() if "launch_rollout_servers" in text}
    assert starts == set(TRAINER_SERVER_JOBS.values()), starts
    assert {name for name, text in scripts.items() if "--sglang-launch" in text} == {"eval.sh"}


@pytest.mark.parametrize("name", ["7b", "32b"])
def test_configs_naming_a_script_state_its_server_tp(jobs, name):
    """The script passes its TP to the trainer; a config it is documented with (the config names the script) states
    the same, so that the config read alone describes the servers it runs with."""
    script = TRAINER_SERVER_JOBS[name]
    [tp] = {arg_after(s["args"], "--tp-size") for s in jobs[name]["servers"]}
    configs = [p for p in sorted((ROOT / "configs").glob("*.yaml")) if f"examples/{script}" in p.read_text()]
    assert configs, script
    assert {p.name: str(load_config(p).rollout.sglang.tp_size) for p in configs} == {p.name: tp for p in configs}


@pytest.mark.parametrize(("name", "tp"), [("eval", 1), ("eval_tp2", 2)])
def test_eval_servers_fill_the_node_at_its_tp(cluster, jobs, name, tp):
    """eval.sh has luffy-eval start the servers (--sglang-launch: server i on GPUs i x TP to (i + 1) x TP - 1), as many
    as fill the node at EVAL_TP GPUs each."""
    gpu_job(cluster, jobs, name)
    [ev] = jobs[name]["evals"]
    args = ev["args"]
    assert "--sglang-launch" in args and arg_after(args, "--sglang-tp") == str(tp), args
    assert int(arg_after(args, "--sglang-servers")) * tp == len(ev["cuda"].split(",")) == 8, ev


def test_each_job_makes_an_api_key_that_servers_demand_and_nothing_prints(cluster, jobs, tmp_path, monkeypatch):
    """Without SGLANG_API_KEY exported, run_7b.sh and run_32b.sh make one key per job: the servers get it as
    --api-key, the trainer in its environment (named by rollout.sglang.api_key_env); the job output, the scripts'
    logs/ and the Slurm daemons' logs never hold it. A server started with those flags answers 401 without it
    (a real SGLang server on its CPU engine, the sglang tier)."""
    keys = {}
    for name in ("7b", "32b"):
        job = jobs[name]
        [key] = {arg_after(s["args"], "--api-key") for s in job["servers"]}
        assert re.fullmatch("[0-9a-f]{64}", key), key
        assert {t["key"] for t in job["trainers"]} == {key}
        assert all("rollout.sglang.api_key_env=SGLANG_API_KEY" in t["args"] for t in job["trainers"])
        printed = [job["log"], str(job["info"]), cluster.logs(lines=100_000)]
        printed += [p.read_text(errors="replace") for p in (job["out"] / "logs").glob("*")]
        assert not any(key in text for text in printed), f"the key of job {name} was printed"
        keys[name] = key
    assert keys["7b"] != keys["32b"], "one key per job"

    monkeypatch.setenv("LUFFY_TEST_JOB_KEY", keys["7b"])
    cfg = cpu_server_config(sglang_python(), free_port_block(), api_key_env="LUFFY_TEST_JOB_KEY")
    [server] = launch_servers(cfg, save_tiny_model(tmp_path / "model"), log_dir=str(tmp_path / "logs"))
    url = server.url
    body = json.dumps({"input_ids": [2, 3], "sampling_params": {"max_new_tokens": 2}}).encode()
    try:
        for headers, status in (
            ({}, 401),
            ({"Authorization": "Bearer wrong"}, 401),
            ({"Authorization": f"Bearer {keys['7b']}"}, 200),
        ):
            req = urllib.request.Request(
                url + "/generate", data=body, headers={"Content-Type": "application/json", **headers}
            )
            try:
                with urllib.request.urlopen(req, timeout=60) as r:
                    got = r.status
            except urllib.error.HTTPError as e:
                got = e.code
            assert got == status, (headers.keys(), got)
        with urllib.request.urlopen(url + "/health", timeout=60) as r:
            assert r.status == 200, "health checks need no key"
    finally:
        stop_processes([server])


def test_a_server_step_that_exits_is_started_again(cluster, jobs):
    info, servers, trainers = gpu_job(cluster, jobs, "7b_restart")
    ports = sorted(arg_after(s["args"], "--port") for s in servers)
    assert ports == sorted(["30000", "30001", "30002", "30003"] * 2), ports
    assert {s["key"] for s in servers} == {t["key"] for t in trainers}, "the same key after a restart"
    log = jobs["7b_restart"]["log"]
    assert log.count("exited; starting it again in 1 s") == 4, log[-3000:]
