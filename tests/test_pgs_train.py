"""python -m pgs_kernels.train: open_clip's trainer with PGS, on the CPU.

A tiny CLIP (``local-dir:`` config: 64x64 images, 16 patches, two blocks per
tower) trains on captioned scene PNGs the tests write, through the real
``open_clip_train.main``: what reaches the image tower's blocks in training
and in evaluation, the options the published flags map to, the schedule
(per epoch and after ``--resume``), torchrun with two CPU ranks, the losses
without PGS flags, and the flags it cannot honour.

open_clip_train imports only beside a CUDA build of torch (torchvision's
wheel needs one), so these tests run in the users' environment
(requirements-cuda.txt) and skip elsewhere; with ``PGS_TEST_INTEGRATIONS=1``
a missing trainer is a failure.
"""

import importlib
import json
import logging
import os
import re
import subprocess
import sys

import pytest
import torch

import pgs_kernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _import(name):
    try:
        return importlib.import_module(name)
    except Exception as exc:  # torchvision beside a CPU-only torch raises RuntimeError, not ImportError
        return exc


trainer = _import("open_clip_train.main")
HAVE_TRAINER = not isinstance(trainer, Exception)
if os.environ.get("PGS_TEST_INTEGRATIONS") == "1":
    assert HAVE_TRAINER, f"PGS_TEST_INTEGRATIONS=1 but open_clip_train does not import: {trainer!r}"
pytestmark = pytest.mark.skipif(not HAVE_TRAINER, reason=f"open_clip_train does not import: {trainer!r}")

if HAVE_TRAINER:
    from pgs_kernels import train

SIZE, PATCH, SAMPLES, BATCH = 64, 16, 16, 4
L = (SIZE // PATCH) ** 2  # 16 patches
PUBLISHED = ["--force-patch-dropout", "0.05", "--target-mask-ratio", "0.5", "--min-mask-ratio", "0.3", "--use-ed",
             "--use-otn"]
K_PUBLISHED = int(L * (1 - 0.3))  # 11 kept


def _tiny_config(vision_cfg):
    return {"model_cfg": {"embed_dim": 32, "vision_cfg": vision_cfg,
                          "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2,
                                       "layers": 2}},
            "preprocess_cfg": {}}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """16 captioned scene PNGs and their TSV (open_clip_train's CSV format),
    a tiny ViT CLIP and a tiny hybrid (ResNet stem) CLIP as local-dir configs."""
    import numpy as np
    from PIL import Image

    from bench.clip.scenes import CaptionedScenes

    root = tmp_path_factory.mktemp("pgs_train_data")
    images, captions = CaptionedScenes(image_size=SIZE, seed=0).render(range(SAMPLES))
    rows = ["filepath\ttitle"]
    for i, (image, caption) in enumerate(zip(images, captions)):
        path = root / f"scene{i}.png"
        Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(path)
        rows.append(f"{path}\t{caption}")
    (root / "train.tsv").write_text("\n".join(rows) + "\n")
    models = {
        "tiny": {"image_size": SIZE, "layers": 2, "width": 64, "head_width": 32, "patch_size": PATCH},
        "hybrid": {"timm_model_name": "vit_tiny_r_s16_p8_224", "timm_model_pretrained": False, "timm_pool": "",
                   "timm_proj": "linear", "image_size": 224},
    }
    for name, vision_cfg in models.items():
        (root / name).mkdir()
        (root / name / "open_clip_config.json").write_text(json.dumps(_tiny_config(vision_cfg)))
    return {"tsv": str(root / "train.tsv"), "model": f"local-dir:{root / 'tiny'}",
            "hybrid": f"local-dir:{root / 'hybrid'}"}


def _argv(data, logs, name, *extra, epochs=2, val=True, model=None):
    return ["--train-data", data["tsv"], *(["--val-data", data["tsv"]] if val else []), "--dataset-type", "csv",
            "--model", model or data["model"], "--batch-size", str(BATCH), "--epochs", str(epochs), "--workers", "0",
            "--precision", "fp32", "--device", "cpu", *(["--logs", str(logs)] if logs else []), "--name", name,
            "--seed", "0",
            "--warmup", "1", "--log-every-n-steps", "1", *extra]


@pytest.fixture
def logging_restored():
    """open_clip_train sets the logging up for its process: put it back after an in-process run."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    levels = {name: lg.level for name, lg in root.manager.loggerDict.items() if isinstance(lg, logging.Logger)}
    yield
    for h in root.handlers[:]:
        if h not in handlers:
            root.removeHandler(h)
            h.close()
    root.setLevel(level)
    for name, lg in root.manager.loggerDict.items():
        if isinstance(lg, logging.Logger):
            lg.setLevel(levels.get(name, logging.NOTSET))


@pytest.fixture
def recorder(monkeypatch):
    """What the trainer does to the model: the use_pgs options, the token count
    each image-tower call hands its blocks (training or eval), and the token
    weight at the start of each epoch."""
    seen = {"options": [], "tokens": [], "weights": {}}
    create = trainer.create_model_and_transforms

    def recording_create(*a, **kw):
        model, pre_train, pre_val = create(*a, **kw)
        model.visual.transformer.register_forward_pre_hook(
            lambda m, args: seen["tokens"].append(("train" if m.training else "eval", args[0].shape[1])))
        return model, pre_train, pre_val

    real_use_pgs = train.use_pgs

    def recording_use_pgs(model, **options):
        if next(model.parameters()).device.type != "meta":  # not the check before the run
            seen["options"].append(options)
        return real_use_pgs(model, **options)

    run_epoch = trainer.train_one_epoch

    def recording_epoch(model, data, loss, epoch, *rest, **kw):
        layers = [m for m in model.modules() if isinstance(m, pgs_kernels.PGSPatchDropout)]
        seen["weights"][epoch] = [layer.token_weight for layer in layers]
        return run_epoch(model, data, loss, epoch, *rest, **kw)

    monkeypatch.setattr(trainer, "create_model_and_transforms", recording_create)
    monkeypatch.setattr(trainer, "train_one_epoch", recording_epoch)
    monkeypatch.setattr(train, "use_pgs", recording_use_pgs)
    return seen


def _losses(log_path):
    return [m.group(1) for m in re.finditer(r"Train Epoch: .* Loss: (\S+)", open(log_path).read())]


def test_published_flags_two_epochs(data, tmp_path, recorder, logging_restored):
    """The published recipe's flags on a CSV of scene PNGs, 2 epochs: the
    blocks see 1 + K tokens in training and 1 + L in evaluation, the flags map
    to the options stated, the schedule is epoch / epochs, and checkpoints,
    validation results and params.txt are open_clip_train's."""
    status = train.main(_argv(data, tmp_path, "published", *PUBLISHED))
    assert status == 0
    assert recorder["options"] == [{"mask_ratio": 0.3, "candidate_ratio": 0.05, "sim_threshold": 0.5,
                                    "edge_weight": 1.0, "use_ot": True, "token_weight": 0.0, "backend": "auto"}]
    modes = {mode: {n for m, n in recorder["tokens"] if m == mode} for mode in ("train", "eval")}
    assert modes == {"train": {1 + K_PUBLISHED}, "eval": {1 + L}}
    assert sum(m == "train" for m, _ in recorder["tokens"]) == 2 * SAMPLES // BATCH
    assert recorder["weights"] == {0: [0.0], 1: [0.5]}
    run = tmp_path / "published"
    assert {p.name for p in (run / "checkpoints").iterdir()} == {"epoch_1.pt", "epoch_2.pt", "results.jsonl"}
    params = (run / "params.txt").read_text()
    assert "min_mask_ratio: 0.3" in params and "pgs: True" in params and "force_patch_dropout: 0.0" in params
    log = (run / "out.log").read_text()
    assert f"1 + {K_PUBLISHED} of the 1 + {L} tokens" in log and "token_weight = 1 / 2 = 0.5" in log
    # the checkpoint keys are the model's own: the model without PGS loads it, strictly
    import open_clip

    ckpt = torch.load(run / "checkpoints" / "epoch_2.pt", map_location="cpu", weights_only=False)
    assert ckpt["epoch"] == 2
    open_clip.create_model(data["model"]).load_state_dict(ckpt["state_dict"])


def test_resume_sets_the_schedule(data, tmp_path, recorder, logging_restored):
    """--resume from epoch 1 of 3: the first epoch run is 1, token weight 1/3, then 2/3."""
    assert train.main(_argv(data, tmp_path, "first", "--pgs", "--use-ed", epochs=3, val=False)) == 0
    assert recorder["weights"] == {0: [0.0], 1: [pytest.approx(1 / 3)], 2: [pytest.approx(2 / 3)]}
    recorder["weights"].clear()
    resume = str(tmp_path / "first" / "checkpoints" / "epoch_1.pt")
    assert train.main(_argv(data, tmp_path, "resumed", "--pgs", "--use-ed", "--resume", resume, epochs=3,
                            val=False)) == 0
    assert recorder["weights"] == {1: [pytest.approx(1 / 3)], 2: [pytest.approx(2 / 3)]}
    assert "resuming checkpoint" in (tmp_path / "resumed" / "out.log").read_text()
    # a fixed weight replaces the schedule
    recorder["weights"].clear()
    assert train.main(_argv(data, tmp_path, "fixed", "--pgs", "--pgs-token-weight", "0.25", epochs=1,
                            val=False)) == 0
    assert recorder["weights"] == {0: [0.25]}


def test_without_pgs_flags_the_losses_of_open_clip_train(data, tmp_path, recorder, logging_restored):
    """No PGS flags: the logged losses of open_clip_train.main itself, step for
    step, for the same seed; with --force-patch-dropout alone too, which stays
    open_clip's random patch dropout."""
    for extra, tokens in (((), 1 + L), (("--force-patch-dropout", "0.5"), 1 + L // 2)):
        ours = train.main(_argv(data, tmp_path, f"ours{len(extra)}", *extra, epochs=1, val=False))
        assert ours == 0 and not recorder["options"]
        assert {n for m, n in recorder["tokens"] if m == "train"} == {tokens}
        root, before = logging.getLogger(), list(logging.getLogger().handlers)
        theirs = trainer.main(_argv(data, tmp_path, f"theirs{len(extra)}", *extra, epochs=1, val=False))
        assert theirs is None
        for h in root.handlers[:]:  # its run leaves its log handlers on the root logger: one log per run
            if h not in before:
                root.removeHandler(h)
                h.close()
        a = _losses(tmp_path / f"ours{len(extra)}" / "out.log")
        b = _losses(tmp_path / f"theirs{len(extra)}" / "out.log")
        assert len(a) == SAMPLES // BATCH and a == b
        recorder["tokens"].clear()


ERRORS = [
    # (extra flags, model or None for the tiny ViT, what the message must name)
    (PUBLISHED, "RN50", ["--model RN50", "ModifiedResNet"]),
    (PUBLISHED, "hybrid", ["--model local-dir:", "HybridEmbed"]),
    (["--pgs", "--force-image-size", "72"], None, ["--model", "72x72", "16x16"]),
    (["--pgs", "--min-mask-ratio", "1.0"], None, ["--min-mask-ratio", "(0, 1), got 1.0"]),
    (["--pgs", "--min-mask-ratio", "0"], None, ["--min-mask-ratio 0"]),
    (["--pgs", "--min-mask-ratio", "-0.2"], None, ["--min-mask-ratio"]),
    (["--target-mask-ratio", "0.5", "--force-patch-dropout", "1.5"], None, ["--force-patch-dropout"]),
    (["--force-patch-dropout", "1.0"], None, ["--force-patch-dropout", "random patch dropout"]),
    (["--use-ed", "--use-otn"], None, ["--use-ed, --use-otn", "PGS, which is off"]),
    (["--target-mask-ratio", "0", "--min-mask-ratio", "0.3"], None, ["--min-mask-ratio", "--target-mask-ratio <= 0"]),
    (["--pgs", "--pgs-edge-weight", "2"], None, ["--pgs-edge-weight needs --use-ed"]),
    (["--pgs", "--pgs-ot-iters", "3"], None, ["--pgs-ot-iters needs --use-otn"]),
    (["--pgs", "--use-otn", "--pgs-ot-reg", "1e-6"], None, ["--pgs-ot-reg"]),
    (["--pgs", "--pgs-token-weight", "1.5"], None, ["--pgs-token-weight"]),
    (["--pgs", "--pgs-schedule-epochs", "0"], None, ["--pgs-schedule-epochs"]),
    (["--pgs", "--torchscript"], None, ["--torchscript"]),
]


@pytest.mark.parametrize("extra,model,words", ERRORS, ids=[" ".join(e[0][:3]) + f" {e[1] or ''}" for e in ERRORS])
def test_what_it_cannot_honour_stops_before_anything_is_written(data, tmp_path, capsys, extra, model, words):
    logs = tmp_path / "logs"
    model = data.get(model, model)
    with pytest.raises(SystemExit) as exc:
        train.main(_argv(data, logs, "never", *extra, model=model))
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert err.startswith("python -m pgs_kernels.train: error:") and all(w in err for w in words), err
    assert not logs.exists()


def test_command_line(data, tmp_path):
    """The module as a command: --help lists open_clip_train's flags and the
    PGS group; a model PGS cannot serve is exit status 2, one line, no
    traceback, no files."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "pgs_kernels.train"]
    out = subprocess.run(cmd + ["--help"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "usage: python -m pgs_kernels.train" in out.stdout and "--train-data" in out.stdout
    group = out.stdout[out.stdout.index("PGS patch selection"):]
    assert all(f in group for f in ("--pgs ", "--min-mask-ratio", "--target-mask-ratio", "--use-ed", "--use-otn",
                                    "--pgs-backend", "--force-patch-dropout"))
    bad = subprocess.run(cmd + _argv(data, tmp_path / "logs", "never", *PUBLISHED, model="RN50"), cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--model RN50" in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
    assert not (tmp_path / "logs").exists()


DRIVER = """
import json, os, sys
import open_clip_train.main as trainer
from pgs_kernels import train

seen = []
create = trainer.create_model_and_transforms

def recording(*a, **kw):
    model, pre_train, pre_val = create(*a, **kw)
    model.visual.transformer.register_forward_pre_hook(lambda m, args: seen.append([m.training, args[0].shape[1]]))
    return model, pre_train, pre_val

trainer.create_model_and_transforms = recording
status = train.main(sys.argv[1:])
with open(os.path.join(os.path.dirname(__file__), "tokens-%s.json" % os.environ["RANK"]), "w") as f:
    json.dump(seen, f)
sys.exit(status)
"""


def test_torchrun_two_cpu_ranks(data, tmp_path):
    """torchrun --nproc_per_node 2 with gloo on the CPU (DistributedDataParallel
    without device_ids): both ranks mask, rank 0 writes the checkpoint."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    # torchrun (torch 2.14) takes --logs after the script for an abbreviation of its own --logs-specs and
    # stops: the run writes to open_clip_train's default, ./logs/
    logs = tmp_path / "logs"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(driver),
           *_argv(data, None, "ddp", *PUBLISHED, "--dist-backend", "gloo", epochs=1, val=False)]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    for rank in (0, 1):
        seen = json.loads((tmp_path / f"tokens-{rank}.json").read_text())
        assert seen and all(n == 1 + K_PUBLISHED for training, n in seen if training), (rank, seen)
        assert sum(training for training, _ in seen) == SAMPLES // BATCH // 2
    assert (logs / "ddp" / "checkpoints" / "epoch_1.pt").is_file()
    log = (logs / "ddp" / "out.log").read_text()
    assert "Running in distributed mode with multiple processes" in log and "total 2" in log
