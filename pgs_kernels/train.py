r"""``python -m pgs_kernels.train``: open_clip's own trainer, with PGS masking.

This runs ``open_clip_train.main`` (the trainer in the ``open_clip_torch``
wheel; 3.3.0 tested; ``pip install "pgs-kernels[train]"``) unchanged: its
data (CSV, webdataset, synthetic), torchrun and SLURM, checkpoints and
``--resume``, zero-shot and validation evaluation, logs, ``params.txt`` and
every one of its flags work as they do there. It adds the flags of the
published CLIP-PGS code (an open_clip fork, ``clip-train.sh``), with that
code's meaning, and ``--pgs-*`` flags for the rest of
:func:`pgs_kernels.pgs_select`'s options. A user of the published code
changes only the module name (``-m training.main`` becomes ``-m
pgs_kernels.train``).

What it changes in the run, and nothing else:

* the model open_clip_train builds gets :func:`pgs_kernels.use_pgs` right
  after it is built, before DistributedDataParallel or ``--torchcompile``
  wraps it (a ``--distill-model`` teacher does not);
* with the schedule, :func:`pgs_kernels.set_pgs_epoch` runs at the start of
  every training epoch, a resumed run's first epoch included:
  ``token_weight = epoch / epochs``;
* on a CPU, DistributedDataParallel is built without ``device_ids``
  (open_clip_train 3.3.0 passes ``device_ids=[device]`` on every device, and
  torch rejects that for a CPU module), so ``torchrun`` with ``--device cpu
  --dist-backend gloo`` works.

The model check (a ResNet, a hybrid or an otherwise unsupported image tower;
images the patch size does not divide) and the flag checks run before the
trainer starts: a run that cannot be honoured stops with exit status 2 and a
message naming the flag or model, before anything is written.

PGS flags (PGS is on with ``--pgs``, or with ``--target-mask-ratio`` above 0
as in the published code; the other PGS flags without it are an error):

    flag                     pgs_select option  meaning (default with PGS on)
    --pgs                                       PGS on (the published code turns it on with
                                                --target-mask-ratio > 0; that works too)
    --force-patch-dropout R  candidate_ratio    share of patches generated as candidates (0.05),
                                                in [0, 1]; with PGS off, open_clip's random patch dropout
    --min-mask-ratio R       mask_ratio         share of patches dropped (0.5), in (0, 1): exactly R;
                                                the published code drops at least R, more when a batch's
                                                similar sets are large (a count that varies per batch)
    --target-mask-ratio T    sim_threshold      a patch more similar than T to the candidates is dropped
                                                early (0.5): what this flag is in the published code,
                                                whatever its name says
    --use-ed                 edge_weight        the edge prior: weight 1.0 (or --pgs-edge-weight); without
                                                it 0
    --use-otn                use_ot             optimal-transport normalization of the similarities
    --pgs-edge-weight W      edge_weight        the edge prior's weight (needs --use-ed)
    --pgs-ot-reg E           ot_reg             entropic regularization (0.05; needs --use-otn)
    --pgs-ot-iters N         ot_iters           Sinkhorn iterations (20; needs --use-otn)
    --pgs-token-weight A     token_weight       a fixed token-similarity weight in [0, 1] instead of the
                                                schedule epoch / epochs
    --pgs-schedule-epochs N                     the schedule's denominator (--epochs; the published code
                                                divides by 32 whatever --epochs is)
    --pgs-backend B          backend            auto (default), triton, native or reference

The published recipe (``clip-train.sh``, CLIP-PGS-0.5; CLIP-PGS-0.3 has
``--min-mask-ratio 0.3``), on 8 GPUs::

    torchrun --nproc_per_node 8 -m pgs_kernels.train --train-data "/data/CC12M/{00000..01242}.tar" \
        --train-num-samples 10968539 --imagenet-val /data/ImageNet1k/val --batch-size 512 --epochs 32 \
        --lr 1e-3 --warmup 10000 --workers 8 --model ViT-B-16 --seed 0 --local-loss --gather-with-grad \
        --grad-checkpointing --save-frequency 8 --zeroshot-frequency 1 --save-most-recent \
        --force-patch-dropout 0.05 --target-mask-ratio 0.5 --min-mask-ratio 0.5 --use-ed --use-otn

torchrun (torch 2.14) refuses ``--logs`` after the module, which it takes for
an abbreviation of its own ``--logs-specs``; start it in the folder whose
``./logs/`` (open_clip_train's default) should receive the logs.

A first run on a CPU, synthetic data::

    python -m pgs_kernels.train --pgs --use-ed --use-otn --dataset-type synthetic --train-num-samples 16 \
        --batch-size 4 --model ViT-B-32 --epochs 1 --device cpu --precision fp32 --workers 0

``python -m pgs_kernels.train --help`` lists open_clip_train's flags, then the
PGS group. In Python, :func:`main` takes the same arguments as a list.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import math
import sys
from typing import List, Optional

import torch

from .backends import NAMES as BACKENDS
from .contract import check_params
from .dropout import PGSPatchDropout
from .integrations import set_pgs_epoch, use_pgs

__all__ = ["main", "parse_args"]

PROG = "python -m pgs_kernels.train"

# pgs_select's defaults where the published flags leave an option open
DEFAULT_CANDIDATE_RATIO = 0.05
DEFAULT_MASK_RATIO = 0.5
DEFAULT_SIM_THRESHOLD = 0.5

_GROUP_DESCRIPTION = (
    "PGS is on with --pgs, or with --target-mask-ratio > 0 as in the published CLIP-PGS code; the other flags of "
    "this group need it on. With PGS on, open_clip's --force-patch-dropout R is PGS's candidate ratio (default "
    "0.05, in [0, 1]), as in the published code, and open_clip's own random patch dropout is off; with PGS off it "
    "keeps open_clip's meaning. Without --use-ed / --use-otn the edge prior / transport normalization is off, as "
    "in the published code.")


class FlagError(ValueError):
    """A flag combination the trainer cannot honour; the message names the flag."""


def _pgs_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, add_help=False, allow_abbrev=False, usage=argparse.SUPPRESS)
    g = p.add_argument_group("PGS patch selection (pgs_kernels.train)", _GROUP_DESCRIPTION)
    g.add_argument("--pgs", action="store_true", help="turn PGS on")
    g.add_argument("--target-mask-ratio", type=float, default=None, metavar="T",
                   help="the similarity threshold: a patch more similar than T to the candidates is dropped early "
                        "(default 0.5). This is what the flag does in the published code, whatever its name says; "
                        "T > 0 also turns PGS on there, and here")
    g.add_argument("--min-mask-ratio", type=float, default=None, metavar="R",
                   help="the share of patches dropped, in (0, 1) (default 0.5): exactly R, so that the kept tokens "
                        "form a dense batch. The published code drops at least R and more when a batch's similar "
                        "sets are large (its CLIP-PGS-0.3 and -0.5 are named after R); a count that varies per "
                        "batch cannot be honoured, and so neither can R = 0 (its 'drop the similar set only')")
    g.add_argument("--use-ed", action="store_true",
                   help="the edge prior on: edge weight 1.0, or --pgs-edge-weight (off: 0)")
    g.add_argument("--use-otn", action="store_true", help="optimal-transport normalization of the similarities")
    g.add_argument("--pgs-edge-weight", type=float, default=None, metavar="W",
                   help="the edge prior's weight, >= 0 (default 1.0; needs --use-ed)")
    g.add_argument("--pgs-ot-reg", type=float, default=None, metavar="E",
                   help="entropic regularization of the transport, >= 1e-4 (default 0.05; needs --use-otn)")
    g.add_argument("--pgs-ot-iters", type=int, default=None, metavar="N",
                   help="Sinkhorn iterations, >= 1 (default 20; needs --use-otn)")
    g.add_argument("--pgs-token-weight", type=float, default=None, metavar="A",
                   help="a fixed weight of token similarity against pixel similarity, in [0, 1], instead of the "
                        "published schedule epoch / epochs")
    g.add_argument("--pgs-schedule-epochs", type=float, default=None, metavar="N",
                   help="the schedule's denominator: token weight = epoch / N (default: --epochs; the published "
                        "code divides by 32 whatever --epochs is)")
    g.add_argument("--pgs-backend", choices=BACKENDS, default=None,
                   help="the pgs_select kernel (default auto: triton on CUDA, native or reference on a CPU)")
    return p


# The flags that mean something only with PGS on, and their attributes.
_NEEDS_PGS = {"--min-mask-ratio": "min_mask_ratio", "--use-ed": "use_ed", "--use-otn": "use_otn",
              "--pgs-edge-weight": "pgs_edge_weight", "--pgs-ot-reg": "pgs_ot_reg", "--pgs-ot-iters": "pgs_ot_iters",
              "--pgs-token-weight": "pgs_token_weight", "--pgs-schedule-epochs": "pgs_schedule_epochs",
              "--pgs-backend": "pgs_backend"}


def _given(args, attr: str) -> bool:
    v = getattr(args, attr)
    return v is not None and v is not False


def _checked(flag: str, option: str, value):
    """``value`` through pgs_select's own check of ``option``; the error names the flag."""
    try:
        return check_params(**{option: value})[option]
    except (TypeError, ValueError) as exc:
        raise FlagError(f"{flag}: {exc}") from None


def pgs_options(args) -> Optional[dict]:
    """The :func:`use_pgs` options the flags in ``args`` ask for (``None`` with
    PGS off); :class:`FlagError` naming the flag for a value or a combination
    that cannot be honoured. Sets ``args.force_patch_dropout`` to 0 with PGS
    on: PGS replaces open_clip's random patch dropout."""
    on = args.pgs or (args.target_mask_ratio is not None and args.target_mask_ratio > 0)
    if not on:
        stray = [flag for flag, attr in _NEEDS_PGS.items() if _given(args, attr)]
        if stray:
            why = ("--target-mask-ratio <= 0 leaves it off, as in the published code"
                   if args.target_mask_ratio is not None else "neither --pgs nor --target-mask-ratio > 0 was given")
            raise FlagError(f"{', '.join(stray)} configure PGS, which is off ({why}); add --pgs to turn it on")
        p = args.force_patch_dropout
        if p is not None and not 0.0 <= p < 1.0:
            raise FlagError(f"--force-patch-dropout: open_clip's random patch dropout must be in [0, 1), got {p}")
        return None

    mask_ratio = DEFAULT_MASK_RATIO if args.min_mask_ratio is None else args.min_mask_ratio
    if mask_ratio == 0:
        raise FlagError("--min-mask-ratio 0: the published code then drops the similar set alone, a count that "
                        "varies per batch; here the count is fixed: give the share to drop, in (0, 1)")
    if not 0 < mask_ratio < 1:
        raise FlagError(f"--min-mask-ratio: the share of patches dropped must be in (0, 1), got {mask_ratio}")
    options = {
        "mask_ratio": mask_ratio,
        "candidate_ratio": _checked("--force-patch-dropout", "candidate_ratio",
                                    DEFAULT_CANDIDATE_RATIO if args.force_patch_dropout is None
                                    else args.force_patch_dropout),
        "sim_threshold": _checked("--target-mask-ratio", "sim_threshold",
                                  DEFAULT_SIM_THRESHOLD if args.target_mask_ratio is None else args.target_mask_ratio),
    }
    if not math.isfinite(options["sim_threshold"]):
        raise FlagError(f"--target-mask-ratio must be finite, got {args.target_mask_ratio}")

    if args.pgs_edge_weight is not None and not args.use_ed:
        raise FlagError("--pgs-edge-weight needs --use-ed (without it the edge prior is off)")
    edge = (1.0 if args.pgs_edge_weight is None else args.pgs_edge_weight) if args.use_ed else 0.0
    options["edge_weight"] = _checked("--pgs-edge-weight", "edge_weight", edge)

    options["use_ot"] = bool(args.use_otn)
    for flag, attr, option in (("--pgs-ot-reg", "pgs_ot_reg", "ot_reg"),
                               ("--pgs-ot-iters", "pgs_ot_iters", "ot_iters")):
        value = getattr(args, attr)
        if value is not None:
            if not args.use_otn:
                raise FlagError(f"{flag} needs --use-otn (without it there is no transport)")
            options[option] = _checked(flag, option, value)

    if args.pgs_token_weight is not None:
        if args.pgs_schedule_epochs is not None:
            raise FlagError("--pgs-schedule-epochs sets the schedule that --pgs-token-weight replaces: give one")
        options["token_weight"] = _checked("--pgs-token-weight", "token_weight", args.pgs_token_weight)
    else:
        n = args.pgs_schedule_epochs
        if n is not None and not (math.isfinite(n) and n > 0):
            raise FlagError(f"--pgs-schedule-epochs must be a number > 0, got {n}")
        options["token_weight"] = 0.0  # the schedule's value at epoch 0; set every epoch
    options["backend"] = args.pgs_backend or "auto"

    if getattr(args, "torchscript", False):
        raise FlagError("--torchscript: PGS goes into the eager model (use --torchcompile to compile it)")
    args.force_patch_dropout = 0.0
    return options


def parse_args(argv: List[str]) -> argparse.Namespace:
    """open_clip_train's arguments from ``argv`` plus the PGS flags: its
    namespace, with the PGS flags, ``pgs`` (on or off) and ``pgs_options``
    (the :func:`use_pgs` options, or None) added, so that ``params.txt``
    records them. Exits like argparse on a flag either parser rejects;
    :class:`FlagError` for PGS values that cannot be honoured."""
    from open_clip_train.params import parse_args as open_clip_parse_args

    pgs, rest = _pgs_parser().parse_known_args(argv)
    args = open_clip_parse_args(rest)
    for name, value in vars(pgs).items():
        setattr(args, name, value)
    args.pgs_options = pgs_options(args)
    args.pgs = args.pgs_options is not None
    return args


# --------------------------------------------------------------------------- the model check, before any file


def _to_pair(size):
    if size is None:
        return None
    if isinstance(size, (list, tuple)):
        return (int(size[0]), int(size[-1]))
    return (int(size), int(size))


def check_model(args) -> Optional[str]:
    """Build the model ``args`` name on the meta device (no memory, no weights)
    and put PGS into it, so that a model PGS cannot serve, or images its patch
    size does not divide, stop the run before open_clip_train writes anything
    (FlagError). Returns a note when the model could not be built here (the
    check then happens when open_clip_train builds it)."""
    import open_clip

    size = args.force_image_size
    if isinstance(size, (list, tuple)) and len(size) == 1:
        size = size[0]
    # open_clip calls logging.warning() before open_clip_train sets the logging
    # up; with no handler on the root logger that would install a second one.
    guard = logging.NullHandler()
    logging.root.addHandler(guard)
    try:
        with torch.device("meta"):
            model = open_clip.create_model(
                args.model, None, load_weights=False, device="meta", precision="fp32",
                force_quick_gelu=args.force_quick_gelu, force_custom_text=args.force_custom_text,
                force_patch_dropout=args.force_patch_dropout, force_image_size=size,
                force_context_length=args.force_context_length, pretrained_image=False, pretrained_text=False,
                cache_dir=args.cache_dir)
    except Exception as exc:  # e.g. no network for an hf-hub: config; open_clip_train will report it
        return f"could not build {args.model} on the meta device to check it first ({type(exc).__name__}: {exc})"
    finally:
        logging.root.removeHandler(guard)
    try:
        use_pgs(model, **args.pgs_options)
    except (TypeError, ValueError) as exc:
        raise FlagError(f"--model {args.model}: PGS cannot serve this model: {exc}") from None
    slot = next(m for m in model.modules() if isinstance(m, PGSPatchDropout))
    hw = _to_pair(getattr(getattr(model, "visual", model), "image_size", None))
    P = slot.patch_size
    if hw is not None and (hw[0] % P or hw[1] % P):
        raise FlagError(f"--model {args.model}: images of {hw[0]}x{hw[1]} do not divide into its {P}x{P} patches "
                        "(PGS needs whole patches; see --force-image-size)")
    return None


# --------------------------------------------------------------------------- the hooks into open_clip_train.main


class CPUSafeDistributedDataParallel(torch.nn.parallel.DistributedDataParallel):
    """DistributedDataParallel that drops CPU ``device_ids``: open_clip_train
    3.3.0 passes ``device_ids=[device]`` on every device, and torch accepts
    ``device_ids`` only for a module on one GPU."""

    def __init__(self, module, device_ids=None, *args, **kwargs):
        if device_ids is not None and all(torch.device(d).type == "cpu" for d in device_ids):
            device_ids = None
        super().__init__(module, device_ids, *args, **kwargs)


def _token_count(model, options) -> str:
    slot = next((m for m in model.modules() if isinstance(m, PGSPatchDropout)), None)
    hw = _to_pair(getattr(getattr(model, "visual", None), "image_size", None))
    if slot is None or hw is None:
        return ""
    n, P = slot.num_prefix_tokens, slot.patch_size
    L = (hw[0] // P) * (hw[1] // P)
    K = max(1, int(L * (1.0 - options["mask_ratio"])))
    return f": in training {n} + {K} of the {n} + {L} tokens reach the image tower's blocks"


def _with_pgs(create, args):
    done = False

    def create_model_and_transforms(*a, **kw):
        nonlocal done
        model, preprocess_train, preprocess_val = create(*a, **kw)
        if not done:  # the first model is the one trained; a second is a --distill-model teacher
            done = True
            use_pgs(model, **args.pgs_options)
            opts = ", ".join(f"{k}={v!r}" for k, v in args.pgs_options.items())
            logging.info(f"PGS: use_pgs(model, {opts}){_token_count(model, args.pgs_options)}")
        return model, preprocess_train, preprocess_val

    return create_model_and_transforms


def _with_schedule(train_one_epoch, args):
    def train_one_epoch_with_schedule(model, data, loss, epoch, *rest, **kw):
        epochs = args.pgs_schedule_epochs or args.epochs
        set_pgs_epoch(model, epoch, epochs)
        if args.rank == 0:
            weight = next(m for m in model.modules() if isinstance(m, PGSPatchDropout)).token_weight
            logging.info(f"PGS: epoch {epoch}: token_weight = {epoch} / {epochs:g} = {weight:.4g}")
        return train_one_epoch(model, data, loss, epoch, *rest, **kw)

    return train_one_epoch_with_schedule


@contextlib.contextmanager
def _trainer_hooked(trainer, args):
    """open_clip_train.main with ``args`` already parsed, PGS put into its
    model and the schedule set every epoch; everything put back on exit,
    the logging set-up of its run included (handlers on the root logger,
    levels), so that main() can run again in the same process."""
    names = ("parse_args", "create_model_and_transforms", "train_one_epoch")
    saved = {name: getattr(trainer, name) for name in names}
    saved_ddp = torch.nn.parallel.DistributedDataParallel
    handlers = list(logging.root.handlers)
    levels = {name: lg.level for name, lg in logging.root.manager.loggerDict.items() if isinstance(lg, logging.Logger)}
    root_level = logging.root.level
    trainer.parse_args = lambda _argv: args
    if args.pgs:
        trainer.create_model_and_transforms = _with_pgs(saved["create_model_and_transforms"], args)
        if args.pgs_token_weight is None:
            trainer.train_one_epoch = _with_schedule(saved["train_one_epoch"], args)
    torch.nn.parallel.DistributedDataParallel = CPUSafeDistributedDataParallel
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(trainer, name, value)
        torch.nn.parallel.DistributedDataParallel = saved_ddp
        for h in logging.root.handlers[:]:
            if h not in handlers:
                logging.root.removeHandler(h)
                h.close()
        logging.root.setLevel(root_level)
        for name, lg in logging.root.manager.loggerDict.items():
            if isinstance(lg, logging.Logger):  # a logger made during the run had no level of its own
                lg.setLevel(levels.get(name, logging.NOTSET))


# --------------------------------------------------------------------------- the command


def _import_trainer():
    try:
        import open_clip_train.main as trainer
    except Exception as exc:  # torchvision beside a CPU-only torch raises RuntimeError, not ImportError
        raise FlagError(f"needs open_clip's trainer (open_clip_train, in open_clip_torch >= 3.3, with webdataset, "
                        f"pandas and braceexpand): pip install \"pgs-kernels[train]\" ({type(exc).__name__}: {exc})")
    return trainer


def format_help() -> str:
    """open_clip_train's help, then the PGS group."""
    intro = (f"{PROG}: open_clip's trainer (open_clip_train.main) with PGS patch selection. Every open_clip_train "
             "flag works as there; the PGS flags are at the end.\n\n")
    try:
        from open_clip_train.params import parse_args as open_clip_parse_args
        out = io.StringIO()
        argv0, sys.argv[0] = sys.argv[0], PROG  # argparse names the program after sys.argv[0]
        try:
            with contextlib.redirect_stdout(out):
                open_clip_parse_args(["--help"])
        except SystemExit:
            pass
        finally:
            sys.argv[0] = argv0
        theirs = out.getvalue()
    except Exception as exc:
        theirs = f"(open_clip_train does not import here, so its flags are not listed: {exc})\n"
    return intro + theirs + "\n" + _pgs_parser().format_help()


def _fail(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def main(argv: Optional[List[str]] = None) -> int:
    """Run open_clip_train.main with PGS on ``argv`` (default ``sys.argv[1:]``).
    Returns the exit status (0, or 1 where open_clip_train reports an error
    itself, e.g. an experiment name that exists); raises SystemExit(2) with a
    message for flags that cannot be honoured, before anything is written."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(format_help())
        return 0
    try:
        trainer = _import_trainer()
        args = parse_args(argv)
        note = check_model(args) if args.pgs else None
    except FlagError as exc:
        _fail(str(exc))
    if note:
        print(f"{PROG}: {note}", file=sys.stderr)
    with _trainer_hooked(trainer, args):
        status = trainer.main(argv)
    return 0 if status in (None, 0) else 1


if __name__ == "__main__":
    sys.exit(main())
