"""lm-evaluation-harness: tasks written here as YAML over local JSONL files give the same answers through
the bare `lm_eval --model pretrain` on a checkpoint (the project installed with `pip install -e`, whose
.pth registers the model) and through lm-eval's `--model hf` on its export; `pip install .` registers it
too, and nothing is imported at start-up; loglikelihood_rolling is the sum over lm-eval's windows computed
directly; generate_until is greedy decoding as Hugging Face's generate does it, with a KV cache; an
encoder-decoder scores continuations and refuses the rest."""
from __future__ import annotations

import json
import random
import re
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from tests.trainer.conftest import REPO, child_env, make_run, train_in_process
from trainer.errors import TrainError

N_CTX = 64
TASKS = ("pretrain_mc", "pretrain_ll", "pretrain_rolling", "pretrain_gen")
TASK_YAML = {
    "pretrain_mc": "output_type: multiple_choice\ndoc_to_text: question\ndoc_to_choice: choices\ndoc_to_target: label\n"
                   "metric_list:\n  - metric: acc\n  - metric: acc_norm\n",
    "pretrain_ll": "output_type: loglikelihood\ndoc_to_text: context\ndoc_to_target: target\n"
                   "metric_list:\n  - metric: perplexity\n  - metric: acc\n",
    "pretrain_rolling": "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: text\n"
                        "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n",
    "pretrain_gen": "output_type: generate_until\ndoc_to_text: prompt\ndoc_to_target: answer\n"
                    "generation_kwargs:\n  until: [\".\", \"\\n\"]\n  max_gen_toks: 12\n  do_sample: false\n"
                    "metric_list:\n  - metric: exact_match\n",
}


def sentences(shared_data: Path) -> list[str]:
    text = " ".join((shared_data / "books" / "austen_persuasion.txt").read_text(errors="replace").split())
    return [s for s in re.split(r"(?<=[.!?]) ", text) if 8 <= len(s.split()) <= 40]


def task_documents(shared_data: Path) -> dict[str, list[dict]]:
    """~20 documents a task; the first of each has a context longer than the model's n_ctx."""
    sents, rng = sentences(shared_data)[100:400], random.Random(0)
    long_text = " ".join(sents[200:240])
    halves = [s.split() for s in sents[:80]]
    mc = []
    for i in range(20):
        endings = [" ".join(h[len(h) // 2:]) for h in (halves[i], *rng.sample(halves[20:], 3))]
        order = rng.sample(range(4), 4)
        mc.append({"question": " ".join(halves[i][:len(halves[i]) // 2]), "choices": [endings[j] for j in order],
                   "label": order.index(0)})
    ll = [{"context": s.rsplit(" ", 1)[0], "target": s.rsplit(" ", 1)[1]} for s in sents[80:100]]  # lm-eval adds " "
    gen = [{"prompt": " ".join(s.split()[:6]), "answer": " " + " ".join(s.split()[6:])} for s in sents[100:112]]
    mc[0]["question"] = long_text + " " + mc[0]["question"]
    ll[0]["context"] = long_text + " " + ll[0]["context"]
    gen[0]["prompt"] = long_text + " " + gen[0]["prompt"]
    return {"pretrain_mc": mc, "pretrain_ll": ll, "pretrain_gen": gen,
            "pretrain_rolling": [{"text": t} for t in (long_text + " " + long_text, *sents[120:124])]}


def write_tasks(task_dir: Path, documents: dict[str, list[dict]]) -> None:
    for name, docs in documents.items():
        data = task_dir / f"{name}.jsonl"
        data.write_text("".join(json.dumps(d) + "\n" for d in docs))
        (task_dir / f"{name}.yaml").write_text(f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                               f"    test: {data}\ntest_split: test\n{TASK_YAML[name]}")


@pytest.fixture(scope="module")
def run(tmp_path_factory, recorded_shard_dir) -> Path:
    """A tiny GPT that GPT-2 can express, 64 positions (so long contexts are truncated and long texts take
    several windows), trained 3 steps: its greedy continuations still differ from prompt to prompt."""
    run = make_run(tmp_path_factory.mktemp("lm-eval") / "run", recorded_shard_dir,
                   model_overrides={"attention": "dense", "n_ctx": N_CTX}, train={"max_steps": 3, "seq_len": 32})
    assert train_in_process(run) == 0
    return run


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory) -> tuple[Path, Path]:
    """(the run's `pretrain export hf` directory, its tokenizer: the same directory, which the export writes)."""
    from trainer.export import export_hf

    out, _ = export_hf(run, tmp_path_factory.mktemp("exported") / "model")
    return out, out


def tiktoken_file(shared_data: Path) -> str:
    return str(shared_data / "tokenizer" / "gpt2" / "r50k_base.tiktoken")


def run_lm_eval(command: list[str], model_args: str, task_dir: Path, out: Path, env: dict = None,
                tasks: tuple[str, ...] = TASKS, extra: tuple[str, ...] = ()) -> dict:
    """lm-eval's CLI offline, in its own process: {"samples": task -> its logged samples in document order,
    "results": task -> metrics}."""
    env = (env or child_env()) | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(out / "hf-home")}
    proc = subprocess.run([*command, "--model_args", model_args, "--tasks", ",".join(tasks), "--include_path",
                           str(task_dir), "--batch_size", "4", "--device", "cpu", "--output_path", str(out),
                           "--log_samples", *extra], env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    samples = {}
    for task in tasks:
        (path,) = out.rglob(f"samples_{task}_*.jsonl")
        samples[task] = sorted((json.loads(line) for line in path.read_text().splitlines()), key=lambda s: s["doc_id"])
    (results,) = out.rglob("results_*.json")
    return {"samples": samples, "results": json.loads(results.read_text())["results"]}


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory, shared_data) -> Path:
    task_dir = tmp_path_factory.mktemp("tasks")
    write_tasks(task_dir, task_documents(shared_data))
    return task_dir


@pytest.fixture(scope="module")
def hf_answers(exported, task_dir, tmp_path_factory) -> dict:
    """The reference: lm-eval's own `--model hf` on the export."""
    model_dir, tokenizer_dir = exported
    return run_lm_eval([sys.executable, "-m", "lm_eval", "--model", "hf"],
                       f"pretrained={model_dir},tokenizer={tokenizer_dir}", task_dir, tmp_path_factory.mktemp("hf"))


def assert_same_answers(ours: dict, hf: dict) -> None:
    for task in TASKS:
        assert len(ours["samples"][task]) == len(hf["samples"][task]) >= 5
        for a, b in zip(ours["samples"][task], hf["samples"][task]):
            got, want = a["filtered_resps"], b["filtered_resps"]
            if task == "pretrain_gen":
                assert got == want, a["doc"]
            elif task == "pretrain_rolling":  # the text's log-likelihood
                assert float(got[0]) == pytest.approx(float(want[0]), rel=1e-5)
            else:  # per choice: (log-likelihood, is greedy)
                assert [float(ll) for ll, _ in got] == pytest.approx([float(ll) for ll, _ in want], rel=1e-5, abs=1e-4)
                assert [greedy for _, greedy in got] == [greedy for _, greedy in want]
    for task, metrics in (("pretrain_mc", ("acc,none", "acc_norm,none")), ("pretrain_ll", ("acc,none",)),
                          ("pretrain_gen", ("exact_match,none",))):
        assert [ours["results"][task][m] for m in metrics] == [hf["results"][task][m] for m in metrics]
    for task, metric in (("pretrain_ll", "perplexity,none"), ("pretrain_rolling", "word_perplexity,none")):
        assert ours["results"][task][metric] == pytest.approx(hf["results"][task][metric], rel=1e-4)
    generated = [s["filtered_resps"][0] for s in ours["samples"]["pretrain_gen"]]
    assert sum(map(bool, generated)) >= len(generated) // 2 and len(set(generated)) > 1


def install_into_venv(venv: Path, editable: bool) -> Path:
    """This project, installed (no dependencies) into a new venv that reads the test environment's
    site-packages as a plain path (so its own .pth files, this project's editable install among them,
    stay inactive); the venv's python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = Path(subprocess.check_output([str(python), "-c", PURELIB], text=True).strip())
    (purelib / "zz_test_environment.pth").write_text(sysconfig.get_path("purelib") + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                           *(["-e"] if editable else []), str(REPO)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (purelib / "pretrain_lm_eval_hook.pth").is_file()
    return python


PURELIB = "import sysconfig; print(sysconfig.get_path('purelib'))"
# What an interpreter has imported on starting, and where lm-eval's `pretrain` comes from once lm-eval's
# models are imported the way its CLI imports them.
PROBE = """import json, sys
started = {m: m in sys.modules for m in ("lm_eval", "torch", "trainer", "transformers")}
from lm_eval.api.registry import get_model
import inspect
print(json.dumps({"started": started, "pretrain": inspect.getfile(get_model("pretrain")),
                  "hf": get_model("hf").__name__}))"""


@pytest.fixture(scope="module")
def editable_python(tmp_path_factory) -> Path:
    """The python of a venv with this project installed as `make setup` installs it (`pip install -e`)."""
    return install_into_venv(tmp_path_factory.mktemp("editable") / "venv", editable=True)


def no_pythonpath(env: dict) -> dict:
    """Without PYTHONPATH: the installed project, and what its install put in site-packages, are what run."""
    return {k: v for k, v in env.items() if k != "PYTHONPATH"}


@pytest.mark.slow
@pytest.mark.parametrize("editable", [False, True], ids=["pip-install", "pip-install-e"])
def test_an_install_registers_pretrain_with_lm_eval_without_importing_it_at_startup(tmp_path, editable, request):
    python = request.getfixturevalue("editable_python") if editable else install_into_venv(tmp_path / "venv", False)
    probe = json.loads(subprocess.check_output([str(python), "-c", PROBE], env=no_pythonpath(dict(os.environ)),
                                               cwd=tmp_path, text=True))
    assert probe["started"] == {"lm_eval": False, "torch": False, "trainer": False, "transformers": False}
    where = REPO if editable else tmp_path / "venv"
    assert Path(probe["pretrain"]).is_relative_to(where) and probe["pretrain"].endswith("trainer/harness.py")
    assert probe["hf"] == "HFLM"  # lm-eval's own models are all still there


@pytest.mark.slow
def test_the_bare_lm_eval_command_gives_the_answers_of_model_hf(run, editable_python, hf_answers, task_dir,
                                                                shared_data, tmp_path):
    """`lm_eval --model pretrain` (lm-eval's own console script, run by the venv's python so its
    site-packages are the ones read) on a checkpoint; `--model hf` on its export is the reference."""
    console_script = Path(sys.executable).parent / "lm_eval"
    ours = run_lm_eval([str(editable_python), str(console_script), "--model", "pretrain"],
                       f"checkpoint={run},tokenizer={tiktoken_file(shared_data)}", task_dir, tmp_path / "ours",
                       no_pythonpath(child_env()))
    assert_same_answers(ours, hf_answers)


@pytest.mark.slow
def test_pretrain_lm_eval_registers_the_model_in_a_source_tree_that_was_never_installed(run, hf_answers, task_dir,
                                                                                       shared_data, tmp_path):
    """`pretrain lm-eval` run from the source tree (PYTHONPATH; no hook .pth of this tree in site-packages)."""
    ours = run_lm_eval([sys.executable, "-m", "cluster.cli", "lm-eval", "--model", "pretrain"],
                       f"checkpoint={run},tokenizer={tiktoken_file(shared_data)}", task_dir, tmp_path / "ours",
                       tasks=("pretrain_mc",), extra=("--limit", "5"))
    got = [[float(ll) for ll, _ in s["filtered_resps"]] for s in ours["samples"]["pretrain_mc"]]
    want = [[float(ll) for ll, _ in s["filtered_resps"]] for s in hf_answers["samples"]["pretrain_mc"][:5]]
    assert len(got) == 5 and got == [pytest.approx(w, rel=1e-5, abs=1e-4) for w in want]


def instances(request_type: str, args: list[tuple]) -> list:
    from lm_eval.api.instance import Instance

    return [Instance(request_type=request_type, doc={}, arguments=a, idx=0) for a in args]


@pytest.fixture(scope="module")
def adapter(run, shared_data):
    from trainer.harness import PretrainLM

    return PretrainLM(checkpoint=str(run), batch_size=3, device="cpu", tokenizer=tiktoken_file(shared_data))


def test_loglikelihood_rolling_is_the_sum_over_windows_of_n_ctx_predictions(adapter, shared_data):
    """A text of T tokens after EOT: windows of n_ctx predictions each, the last given a full n_ctx input."""
    texts = [" ".join(sentences(shared_data)[:12]), "A short one.", ""]
    got = adapter.loglikelihood_rolling(instances("loglikelihood_rolling", [(t,) for t in texts]), disable_tqdm=True)
    model, n_ctx = adapter.model, adapter.max_length
    for text, total in zip(texts, got):
        seq = [adapter.eot_token_id] + adapter.tok_encode(text)
        T, expected = len(seq) - 1, 0.0
        for start in range(0, T, n_ctx):  # predict seq[start + 1 : end + 1]
            end = min(start + n_ctx, T)
            first = max(0, end - n_ctx)
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([seq[first:end]])).logits[0].float(), -1)
            targets = torch.tensor(seq[start + 1:end + 1])
            expected += logp[start - first:end - first].gather(1, targets[:, None]).sum().item()
        assert total == pytest.approx(expected, rel=1e-5, abs=1e-4)
    assert len(adapter.tok_encode(texts[0])) > 3 * n_ctx and got[2] == 0.0


def test_generate_until_is_greedy_decoding_with_a_kv_cache(adapter, exported):
    """With the prompt cut to n_ctx - max_gen_toks: Hugging Face's greedy generate on the export, cut at the
    first stop string; after reading its prompt the model is given one new token a step (a KV cache)."""
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(exported[0]).eval()
    prompts = ["It was a truth universally acknowledged", "Anne", "Captain Wentworth said that " * 20]
    stops = {"until": [" the", "\n"], "max_gen_toks": 16, "do_sample": False}
    lengths = []
    hook = adapter.model.register_forward_pre_hook(lambda module, args: lengths.append(args[0].shape[1]))
    try:
        got = adapter.generate_until(instances("generate_until", [(p, stops) for p in prompts]), disable_tqdm=True)
    finally:
        hook.remove()
    prompt_lengths = [len(adapter.tok_encode(p)[-(adapter.max_length - 16):]) for p in prompts]
    assert [n for n in lengths if n > 1] == [n for n in prompt_lengths if n > 1] and len(lengths) > 2 * len(prompts)
    for prompt, text in zip(prompts, got):
        ids = torch.tensor([adapter.tok_encode(prompt)[-(adapter.max_length - 16):]])
        with torch.no_grad():
            out = hf.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=adapter.eot_token_id)
        want = adapter.tok_decode(out[0, ids.shape[1]:].tolist()).split("<|endoftext|>")[0]
        assert text == want.split(" the")[0].split("\n")[0]
    assert len(set(got)) == len(got) and all(got)


def test_bad_model_args_name_the_argument(tmp_path):
    from trainer.harness import PretrainLM

    with pytest.raises(TrainError, match="dtype=float8"):
        PretrainLM(checkpoint=str(tmp_path), dtype="float8")
    with pytest.raises(TrainError, match="batch_size 'auto'"):
        PretrainLM(checkpoint=str(tmp_path), batch_size="auto")


@pytest.mark.slow
def test_an_encoder_decoder_scores_continuations_as_decoder_targets(tmp_path, shard_dir, shared_data):
    """loglikelihood = -(cross-entropy of the continuation as targets, the context and EOS as the encoder's
    input) at any batch size; the rolling likelihood and generation are refused with the reason."""
    from trainer.harness import PretrainLM

    t5 = dict(arch="encoder_decoder", pos_embedding="relative", norm="rmsnorm", bias=False, attention="dense",
              attention_scaling=False, activation="relu", scale_decoder_output=True, init="t5", vocab_size=50358,
              decoder_start_token_id=50257)
    run = make_run(tmp_path / "run", shard_dir, model_overrides=t5,
                   train={"max_steps": 2, "seq_len": 32, "objective": "span_corruption"})
    assert train_in_process(run) == 0
    pairs = [("The weather", " was fine."), ("She said", " no"), ("He", " went home."), ("The weather", " rain")]
    lms = [PretrainLM(checkpoint=str(run), batch_size=b, device="cpu", tokenizer=tiktoken_file(shared_data))
           for b in (1, 4)]
    got = [lm.loglikelihood(instances("loglikelihood", pairs), disable_tqdm=True) for lm in lms]
    lm = lms[0]
    for (context, continuation), (logprob, _), (batched, _) in zip(pairs, *got):
        inputs = torch.tensor([lm.tok_encode(context) + [lm.eot_token_id]])
        targets = torch.tensor([lm.tok_encode(continuation)])
        with torch.no_grad():
            ce = lm.model(inputs, targets).ce_loss.item()
        assert logprob == pytest.approx(-ce * targets.shape[1], rel=1e-5)
        assert batched == pytest.approx(logprob, rel=1e-5)
    with pytest.raises(TrainError, match="encoder-decoder"):
        lm.loglikelihood_rolling(instances("loglikelihood_rolling", [("text",)]))
    with pytest.raises(TrainError, match="encoder-decoder"):
        lm.generate_until(instances("generate_until", [("text", {"until": ["."]})]))
