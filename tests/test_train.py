"""The thin CLIP trainer (bench/clip/model.py, data.py, train.py):
every masking mode trains, the right number of tokens reaches the blocks, a
2-process gloo run works, the loss falls on synthetic scenes, and the CSV
loader reads real files and names the bad ones."""

import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch

from bench.clip.data import CsvCaptions, SyntheticScenes
from bench.clip.model import MASK_MODES, build_model, clip_loss
from bench.clip.train import fit, lr_at, parse_args, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def tiny_batch(n=8, device=DEVICE):
    return SyntheticScenes(64, 32, 256, seed=3).batch(range(n), device)


def blocks_input(model):
    """Record (tokens, attn_mask) as the first image block receives them."""
    seen = {}

    def hook(_mod, args):
        seen["tokens"] = args[0].shape[1]
        seen["mask"] = args[1] if len(args) > 1 else None

    model.visual.transformer.blocks[0].register_forward_pre_hook(hook)
    return seen


@pytest.mark.parametrize("mode", MASK_MODES)
def test_mode_forward_backward(mode):
    torch.manual_seed(0)
    model = build_model("tiny", mode, mask_ratio=0.5).to(DEVICE).train()
    model.visual.set_epoch(1, 2)  # token weight 0.5: the token-similarity path runs too
    seen = blocks_input(model)
    images, text = tiny_batch()
    img_f, txt_f, scale = model(images, text)
    loss = clip_loss(img_f, txt_f, scale)
    loss.backward()
    assert torch.isfinite(loss)
    L = (64 // 8) ** 2
    K = int(L * 0.5)
    if mode == "none":
        assert seen["tokens"] == 1 + L and seen["mask"] is None
    elif mode == "published":
        # batch-dependent K' <= K, and its attention mask sized to match
        assert 2 <= seen["tokens"] <= 1 + K
        assert tuple(seen["mask"].shape) == (8, 1, seen["tokens"], seen["tokens"])
    else:
        assert seen["tokens"] == 1 + K and seen["mask"] is None
    assert model.visual.last_num_tokens == seen["tokens"]
    for p in (model.visual.conv1.weight, model.visual.positional_embedding, model.text.token_embedding.weight,
              model.logit_scale):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    # eval mode sees every patch
    model.eval()
    with torch.no_grad():
        model(images, text)
    assert seen["tokens"] == 1 + L


def test_gradient_checkpointing_matches():
    images, text = tiny_batch(4)
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = build_model("tiny", "none", grad_checkpointing=ckpt).to(DEVICE).train()
        loss = clip_loss(*model(images, text))
        loss.backward()
        grads.append(model.visual.conv1.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-3, atol=1e-5)


def test_synthetic_is_deterministic_per_index():
    d = SyntheticScenes(64, 32, 256, seed=7)
    a_img, a_tok = d.batch(range(0, 6))
    b_img, b_tok = d.batch([4, 5])
    assert torch.equal(a_img[4:], b_img) and torch.equal(a_tok[4:], b_tok)
    c_img, _ = SyntheticScenes(64, 32, 256, seed=8).batch([4, 5])
    assert not torch.equal(b_img, c_img)
    _, caption = d.describe(0)
    assert caption.startswith(("a ", "an ")) and any(w in caption for w in ("left", "right", "top", "bottom", "center"))
    # EOT is the largest id and sits right after the caption
    tok = a_tok[0]
    n = len(d.tokenizer.encode(caption))
    assert tok[0] == 254 and tok[n + 1] == 255 and tok.argmax() == n + 1


def test_unmasked_steps_show_every_patch_at_the_end(tmp_path):
    model, log = fit(parse_args(["--model", "tiny", "--mask", "random", "--mask-ratio", "0.75", "--steps", "4",
                                 "--unmasked-steps", "2", "--batch-size", "4", "--no-progress", "--device", "cpu"]),
                     verbose=False)
    assert [s["tokens"] for s in log["steps"]] == [17, 17, 65, 65]
    assert model.visual.mask == "random" and model.visual.mask_ratio == 0.75


def tf32_flags():
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


@pytest.mark.parametrize("flags", [(False, False), (True, True)])
def test_fit_leaves_the_tf32_flags_as_it_found_them(monkeypatch, flags):
    """fit turns TF32 on for its CUDA matmuls; a later fp32 reference in the
    same process (test_triton's torch.bmm) must not inherit it. The flags are
    settable without CUDA, so on CPU a stand-in training sets them."""
    import bench.clip.train as train_module

    saved = tf32_flags()
    try:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
        fit(parse_args(["--model", "tiny", "--mask", "random", "--steps", "2", "--batch-size", "4",
                        "--no-progress", "--device", DEVICE]), verbose=False)
        assert tf32_flags() == flags

        def sets_tf32_then_fails(*args):
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not flags[0]
            raise RuntimeError("training failed")

        monkeypatch.setattr(train_module, "_fit", sets_tf32_then_fails)
        with pytest.raises(RuntimeError, match="training failed"):
            fit(parse_args(["--device", "cpu"]))
        assert tf32_flags() == flags
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_lr_schedule():
    assert lr_at(0, 100, 10, 1.0) == pytest.approx(0.1)
    assert lr_at(9, 100, 10, 1.0) == pytest.approx(1.0)
    assert lr_at(10, 100, 10, 1.0) == pytest.approx(1.0)
    assert lr_at(55, 100, 10, 1.0) == pytest.approx(0.5)
    assert lr_at(99, 100, 10, 1.0) < 0.01


def test_loss_falls_on_synthetic(tmp_path):
    log = train(parse_args(["--model", "tiny", "--mask", "pgs", "--steps", "60", "--epochs", "2",
                            "--batch-size", "32", "--lr", "1e-3", "--warmup", "10", "--no-progress",
                            "--log-json", str(tmp_path / "log.json")]))
    losses = [s["loss"] for s in log["steps"]]
    assert len(losses) == 60 and all(math.isfinite(x) for x in losses)
    start, end = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert end < 0.75 * start, (start, end)
    saved = json.loads((tmp_path / "log.json").read_text())
    assert saved["benchmark"] == "train" and saved["load"]["threads"] >= 1
    assert saved["summary"]["tokens"] == 33
    # the published schedule: token weight epoch / epochs
    assert {s["token_weight"] for s in saved["steps"]} == {0.0, 0.5}
    assert saved["summary"]["images_per_s"] > 0 and 0 <= saved["summary"]["sel_share"] < 1


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo(tmp_path):
    out = tmp_path / "ddp.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # -m: each worker runs ``python -m bench.clip.train`` from the repository root
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "bench.clip.train",
           "--model", "tiny", "--mask", "pgs", "--steps", "2", "--batch-size", "4", "--device", "cpu",
           "--no-progress", "--log-json", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = json.loads(out.read_text())
    assert log["config"]["world_size"] == 2
    assert len(log["steps"]) == 2 and all(math.isfinite(s["loss"]) for s in log["steps"])


def test_gathered_loss_keeps_local_gradient():
    """Without a process group the loss is the plain symmetric InfoNCE."""
    torch.manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(5, 8), dim=-1).requires_grad_()
    b = torch.nn.functional.normalize(torch.randn(5, 8), dim=-1)
    loss = clip_loss(a, b, torch.tensor(10.0))
    logits = 10 * a @ b.t()
    ref = (torch.nn.functional.cross_entropy(logits, torch.arange(5)) +
           torch.nn.functional.cross_entropy(logits.t(), torch.arange(5))) / 2
    torch.testing.assert_close(loss, ref)
    loss.backward()
    assert a.grad.abs().sum() > 0


def make_csv(tmp_path, sizes=((80, 64), (64, 96), (70, 70), (100, 64))):
    from PIL import Image

    rows = ["filepath\ttitle"]
    for i, (w, h) in enumerate(sizes):
        arr = (torch.rand(h, w, 3) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(tmp_path / f"img{i}.png")
        rows.append(f"img{i}.png\tA photo, number {i}!")
    csv_path = tmp_path / "pairs.csv"
    csv_path.write_text("\n".join(rows) + "\n")
    return csv_path


def test_csv_loader(tmp_path):
    csv_path = make_csv(tmp_path)
    ds = CsvCaptions(str(csv_path), image_size=64, context_length=32, vocab_size=256)
    assert len(ds) == 4
    img, tok = ds[1]
    assert img.shape == (3, 64, 64) and img.dtype == torch.float32 and torch.isfinite(img).all()
    assert tok.shape == (32,) and tok[0] == 254 and tok.argmax() == 7  # sot + 6 words/punctuation, then eot
    assert torch.equal(ds[1][1], tok)
    # a short training run reads the CSV end to end
    log = train(parse_args(["--model", "tiny", "--mask", "random", "--data", str(csv_path), "--steps", "2",
                            "--batch-size", "2", "--no-progress", "--device", "cpu"]))
    assert len(log["steps"]) == 2


def test_csv_missing_and_unreadable(tmp_path):
    csv_path = make_csv(tmp_path, sizes=((64, 64),))
    with open(csv_path, "a") as f:
        f.write("nope/missing.png\ta missing picture\n")
        f.write("broken.png\ta broken picture\n")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    ds = CsvCaptions(str(csv_path), image_size=64, context_length=32, vocab_size=256)
    ds[0]
    with pytest.raises(FileNotFoundError, match=r"row 3.*missing\.png"):
        ds[1]
    with pytest.raises(OSError, match=r"row 4.*broken\.png"):
        ds[2]
    with pytest.raises(ValueError, match="no column 'caption'"):
        CsvCaptions(str(csv_path), caption_key="caption")
    with pytest.raises(FileNotFoundError, match="absent.csv"):
        CsvCaptions(str(tmp_path / "absent.csv"))


def _open_clip_imports() -> bool:
    try:
        import open_clip  # noqa: F401
    except Exception:  # torchvision beside a CPU-only torch raises RuntimeError
        return False
    return True


needs_open_clip = pytest.mark.skipif(not _open_clip_imports(), reason="open_clip does not import here "
                                     "(requirements-cuda.txt has it)")


@needs_open_clip
def test_open_clip_model_trains_through_use_pgs(tmp_path):
    """open_clip's ViT-S-32 in the trainer: PGS through use_pgs, unmasked tuning at the end, the schedule."""
    model, log = fit(parse_args(["--model", "open_clip:ViT-S-32", "--mask", "pgs", "--steps", "3", "--epochs", "3",
                                 "--unmasked-steps", "1", "--batch-size", "2", "--no-progress", "--device", "cpu",
                                 "--warmup", "1"]), verbose=False)
    assert [s["tokens"] for s in log["steps"]] == [25, 25, 50]  # 1 + 24 of 49 patches, then all
    assert [s["token_weight"] for s in log["steps"]][:2] == [0.0, 1 / 3]
    assert all(math.isfinite(s["loss"]) for s in log["steps"])
    assert model.visual.mask == "pgs"
    assert isinstance(model.inner.visual.patch_dropout, __import__("pgs_kernels").PGSDropoutSlot)


@needs_open_clip
def test_open_clip_throughput_runs(tmp_path):
    from bench.clip import throughput

    out = tmp_path / "t.json"
    rep = throughput.run(throughput.parse_args(["--device", "cpu", "--model", "open_clip:ViT-S-32", "--batch-size",
                                                "2", "--steps", "1", "--repeats", "1", "--warmup", "0", "--modes", "none,random,pgs",
                                                "--out", str(out)]))
    assert [r["mode"] for r in rep["rows"]] == ["none", "random", "pgs"]
    assert [r["tokens"] for r in rep["rows"]] == [50, 25, 25]
    assert json.loads(out.read_text())["model"] == "open_clip:ViT-S-32"
