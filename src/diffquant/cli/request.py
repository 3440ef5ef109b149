"""One quantization request of the command line: every argument checked before a model is loaded, then run.

``diffquant quantize`` and ``diffquant calibrate`` (the seed's flag names) both build a
:class:`QuantizeRequest` with :func:`prepare` and run it with :func:`execute`.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffquant.api import needs_calibration
from diffquant.cli.folders import MODEL, PIPELINE, folder_kind, pipeline_components, read_json
from diffquant.cli.formats import activation_config, weight_config
from diffquant.config import QuantConfig

DTYPES = ("float32", "bfloat16", "float16")
_SET_BY_DIFFQUANT = {
    "prompt": "--prompts",
    "num_inference_steps": "--steps",
    "generator": "--seed",
    "output_type": "(diffquant keeps latents)",
}


@dataclass(frozen=True)
class CalibrationRun:
    """How the float pipeline is run to calibrate: ``pipe(prompt=prompts, num_inference_steps=steps, ...)``."""

    prompts: tuple[str, ...]
    steps: int
    seed: int
    pipe_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class QuantizeRequest:
    """A checked request: what to load, how to quantize it, where to write it."""

    source: str  # a folder, or "digits"
    kind: str  # PIPELINE, MODEL or "digits"
    config: QuantConfig
    out: Path
    overwrite: bool = False
    subfolder: str | None = None
    component: str | None = None
    run: CalibrationRun | None = None
    first_blocks: int | None = None
    device: str | None = None
    dtype: str | None = None
    progress: bool = True
    cache_dir: str | None = None


def prepare(args: argparse.Namespace) -> QuantizeRequest:
    """Check every argument of ``quantize`` / ``calibrate`` without loading a model.

    Raises:
        ValueError: a bad format, method or activation spec; a folder that is not a model or pipeline;
            a calibrated config without a pipeline or prompts; a missing or empty prompts file; an output
            folder that is the input, inside it, not empty (without ``--overwrite``) or not writable; a
            pipeline argument the pipeline does not take.
    """
    config = QuantConfig(
        weights=weight_config(args),
        activations=activation_config(args.activations),
        exclude=tuple(args.exclude),
    )
    calibrated = needs_calibration(config)
    kind = "digits" if args.model == "digits" else folder_kind_for_quantize(Path(args.model), args.subfolder)
    if kind == MODEL and calibrated:
        raise ValueError(
            f"{config.label} with --method {config.weights.method} and --activations {args.activations} needs "
            "calibration, which runs the pipeline on prompts: give the pipeline folder (with model_index.json, "
            "no --subfolder) and --prompts FILE. A model folder alone takes calibration-free configs only "
            "(--method rtn, --activations none or intN-dynamic)."
        )
    _check_model_options(args, kind)
    out = _checked_out_dir(Path(args.out), None if kind == "digits" else Path(args.model), args.overwrite)
    run = component = None
    if kind == PIPELINE:
        component = _checked_component(Path(args.model), args.component)
        run = CalibrationRun(
            prompts=_checked_prompts(args.prompts, args.calibration_prompts_limit, calibrated),
            steps=args.steps,
            seed=args.seed,
            pipe_kwargs=_checked_pipe_kwargs(Path(args.model), args),
        )
    return QuantizeRequest(
        source=args.model,
        kind=kind,
        config=config,
        out=out,
        overwrite=args.overwrite,
        subfolder=args.subfolder,
        component=component,
        run=run,
        first_blocks=args.first_blocks,
        device=args.device,
        dtype=args.dtype,
        progress=not args.no_progress,
        cache_dir=args.cache_dir,
    )


def folder_kind_for_quantize(path: Path, subfolder: str | None) -> str:
    """PIPELINE or MODEL (``--subfolder`` always means one model of a pipeline folder)."""
    if not path.is_dir():
        raise ValueError(
            f"{path} is not a folder, so it has no config.json or model_index.json: give a diffusers pipeline "
            "folder (pipe.save_pretrained) or model folder (model.save_pretrained), or 'digits'."
        )
    if subfolder is not None:
        if "_class_name" not in read_json(path / subfolder / "config.json", missing_ok=True):
            raise ValueError(
                f"{path / subfolder} has no config.json naming a model class; give a diffusers model folder "
                "(or a pipeline folder with --subfolder unet / transformer)."
            )
        return MODEL
    kind = folder_kind(path)
    if kind not in (PIPELINE, MODEL):
        raise ValueError(f"{path} is already a {kind}; give the float pipeline or model folder.")
    return kind


def _check_model_options(args: argparse.Namespace, kind: str) -> None:
    """Options that only a pipeline run uses (or, for the digits model, that it cannot take) are refused
    rather than ignored."""
    if kind == PIPELINE:
        return
    pipeline_only = {
        "--prompts": args.prompts,
        "--calibration-prompts-limit": args.calibration_prompts_limit,
        "--component": args.component,
        "--pipe-arg": args.pipe_arg,
        "--height": args.height,
        "--width": args.width,
        "--guidance-scale": args.guidance_scale,
    }
    given = [flag for flag, value in pipeline_only.items() if value]
    if given:
        raise ValueError(
            f"{', '.join(given)} configure the calibration run of a pipeline; {args.model} is not a pipeline "
            "folder (with model_index.json, no --subfolder). Drop them, or give the pipeline folder."
        )
    if kind == "digits" and (args.device or args.dtype):
        raise ValueError("the digits model runs on the CPU in float32; drop --device / --dtype.")


def _checked_out_dir(out: Path, source: Path | None, overwrite: bool) -> Path:
    resolved = out.resolve()
    if source is not None:
        src = source.resolve()
        if resolved == src or src in resolved.parents or resolved in src.parents:
            raise ValueError(
                f"--out {out} overlaps the input folder {source}; write the quantized copy to a new folder "
                "outside it (the input stays the float original)."
            )
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is an existing file; choose a folder path.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(
            f"--out {out} already holds files; choose a new folder, or pass --overwrite to replace it."
        )
    parent = next(p for p in (resolved, *resolved.parents) if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: cannot write in {parent}; choose a folder you can write to.")
    return out


def _checked_component(path: Path, component: str | None) -> str:
    import diffusers

    models = [
        name
        for name, (library, cls) in pipeline_components(path).items()
        if library == "diffusers" and _is_subclass(getattr(diffusers, cls, None), diffusers.ModelMixin)
    ]
    denoisers = [name for name in models if name != "vae"]
    if component is None:
        component = next((name for name in ("unet", "transformer") if name in models), None)
        if component is None:
            raise ValueError(
                f"{path}/model_index.json has neither 'unet' nor 'transformer'; name the denoiser with --component "
                f"(diffusers models here: {denoisers})."
            )
    elif component not in models:
        raise ValueError(
            f"--component {component!r} is not a diffusers model of {path}; choose one of {denoisers}."
        )
    return component


def _is_subclass(cls: object, base: type) -> bool:
    return isinstance(cls, type) and issubclass(cls, base)


def read_prompts(file: str | os.PathLike) -> list[str]:
    """The prompts of ``file``: one per line; blank lines and lines starting with ``#`` are skipped.

    Raises:
        ValueError: a missing, unreadable or empty file.
    """
    file = Path(file)
    if not file.is_file():
        raise ValueError(f"--prompts {file}: no such file; give a text file with one prompt per line.")
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"--prompts {file} is not readable UTF-8 text ({err}).") from err
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise ValueError(f"--prompts {file} holds no prompt; write one prompt per line.")
    return prompts


def _checked_prompts(file: str | None, limit: int | None, calibrated: bool) -> tuple[str, ...]:
    if file is None:
        if calibrated:
            raise ValueError(
                "this config needs calibration: pass --prompts FILE (one prompt per line); the pipeline is run "
                "on them and the denoiser's inputs are recorded."
            )
        return ()
    return tuple(read_prompts(file)[:limit])


def _checked_pipe_kwargs(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    """``--height/--width/--guidance-scale/--pipe-arg KEY=VALUE``, checked against the pipeline's call."""
    kwargs: dict[str, Any] = {}
    for spec in args.pipe_arg or []:
        key, sep, text = spec.partition("=")
        if not sep or not key.isidentifier():
            raise ValueError(f"--pipe-arg {spec!r}: expected KEY=VALUE, e.g. max_sequence_length=120.")
        try:
            kwargs[key] = json.loads(text)
        except json.JSONDecodeError:
            kwargs[key] = text  # a plain string
    for key, value in (
        ("height", args.height),
        ("width", args.width),
        ("guidance_scale", args.guidance_scale),
    ):
        if value is not None:
            kwargs[key] = value
    for key in kwargs:
        if key in _SET_BY_DIFFQUANT:
            raise ValueError(f"--pipe-arg {key}: set by diffquant; use {_SET_BY_DIFFQUANT[key]}.")
    accepted = _call_parameters(path)
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ValueError(
            f"{', '.join(unknown)}: not an argument of this pipeline's __call__; it takes {sorted(accepted)}."
        )
    return kwargs


def _call_parameters(path: Path) -> set[str]:
    """Named parameters of the pipeline class's ``__call__`` (a ``**kwargs`` there takes only deprecated
    arguments in diffusers' pipelines, and would let a misspelt name through unused)."""
    import diffusers

    name = read_json(path / "model_index.json").get("_class_name")
    cls = getattr(diffusers, name, None) if isinstance(name, str) else None
    if not isinstance(cls, type):
        raise ValueError(
            f"{path}/model_index.json names pipeline class {name!r}, which this diffusers "
            f"({diffusers.__version__}) does not have; upgrade diffusers or fix the folder."
        )
    parameters = inspect.signature(cls.__call__).parameters.values()
    return {p.name for p in parameters if p.name != "self" and p.kind is not inspect.Parameter.VAR_KEYWORD}


def execute(request: QuantizeRequest) -> str:
    """Load, quantize and save; returns the line printed for the user."""
    if request.kind == PIPELINE:
        return _quantize_pipeline_folder(request)
    return _quantize_model(request)


def _quantize_model(request: QuantizeRequest) -> str:
    from diffquant.api import quantize_, weight_bits_per_parameter
    from diffquant.io import save_quantized

    calibrate = schedule = None
    config = request.config
    if request.kind == "digits":
        from diffquant.bench.demo import DemoSettings, calibration_fn
        from diffquant.bench.digits.cache import fp_scheduler, load_or_train_fp_model

        model, schedule = load_or_train_fp_model(request.cache_dir), fp_scheduler()
        calibrate = calibration_fn(DemoSettings())
    else:
        model = _load_model(request)
        if request.device is not None:
            model.to(request.device)
    config = _restricted_to_first_blocks(model, config, request.first_blocks)
    quantize_(model.eval(), config, calibrate=calibrate, schedule=schedule, progress=request.progress)
    save_folder(lambda d: save_quantized(model, d), request.out, request.overwrite)
    return f"{config.label}: {weight_bits_per_parameter(model):.2f} bits/weight, saved to {request.out}"


def _load_model(request: QuantizeRequest):
    import diffusers

    folder = Path(request.source) / (request.subfolder or "")
    class_name = read_json(folder / "config.json")["_class_name"]
    cls = getattr(diffusers, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.ModelMixin)):
        raise ValueError(f"{folder}/config.json names {class_name!r}, which is not a diffusers model class.")
    return cls.from_pretrained(request.source, subfolder=request.subfolder, **_dtype_argument(request.dtype))


def _quantize_pipeline_folder(request: QuantizeRequest) -> str:
    from diffusers import DiffusionPipeline

    from diffquant.api import quantized_layers, weight_bits_per_parameter
    from diffquant.integrations.pipeline import quantize_pipeline

    pipe = DiffusionPipeline.from_pretrained(request.source, **_dtype_argument(request.dtype))
    if request.device is not None:
        pipe.to(request.device)
    pipe.set_progress_bar_config(desc="calibration run", leave=False, disable=not request.progress)
    denoiser = getattr(pipe, request.component)
    config = _restricted_to_first_blocks(denoiser, request.config, request.first_blocks)
    run = request.run
    assert run is not None  # prepare() sets it for pipelines
    quantize_pipeline(
        pipe,
        config,
        prompts=run.prompts or ("a photograph",),  # calibration-free configs never run the pipeline
        num_inference_steps=run.steps,
        component=request.component,
        seed=run.seed,
        progress=request.progress,
        **run.pipe_kwargs,
    )
    save_folder(pipe.save_pretrained, request.out, request.overwrite)
    kept = _float_layer_names(denoiser)
    kept_names = ": " + ", ".join(kept[:6]) + (" ..." if len(kept) > 6 else "") if kept else ""
    dtype = f", dtype=torch.{request.dtype}" if request.dtype else ""
    return (
        f"{config.label}: {request.component} ({type(denoiser).__name__}) has {len(quantized_layers(denoiser))} "
        f"quantized layers ({weight_bits_per_parameter(denoiser):.2f} bits/weight), {len(kept)} kept in float"
        f"{kept_names}.\nsaved to {request.out}; load it with "
        f"DiffusionPipeline.from_pretrained({str(request.out)!r}{dtype})"
    )


def _float_layer_names(model) -> list[str]:
    from diffquant.nn.qmodules import is_quantized_layer, quant_layer_class

    return [
        n for n, m in model.named_modules() if quant_layer_class(m) is not None and not is_quantized_layer(m)
    ]


def _restricted_to_first_blocks(model, config: QuantConfig, first_blocks: int | None) -> QuantConfig:
    """Only the layers of the denoiser's first ``first_blocks`` blocks (in calibration order) are quantized."""
    if first_blocks is None:
        return config
    from diffquant.models import get_arch_spec

    blocks = get_arch_spec(model).block_prefixes(model)
    if first_blocks > len(blocks):
        raise ValueError(
            f"--first-blocks {first_blocks}: {type(model).__name__} has {len(blocks)} blocks ({blocks[:3]}...)."
        )
    include = tuple(re.escape(block) + r"\..+" for block in blocks[:first_blocks])
    return dataclasses.replace(config, include=include)


def _dtype_argument(name: str | None) -> dict[str, Any]:
    """``from_pretrained``'s dtype keyword (none: the dtype diffusers picks by default)."""
    import torch

    return {} if name is None else {"dtype": getattr(torch, name)}


def save_folder(write: Callable[[Path], Any], out: Path, overwrite: bool) -> None:
    """``write(folder)`` into a fresh sibling folder, then move it to ``out``: a killed run leaves no half
    written ``out`` (and with ``overwrite``, the old ``out`` stays until the new one is complete)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        write(partial)
        if out.exists():
            if any(out.iterdir()) and not overwrite:
                raise ValueError(f"--out {out} was filled while quantizing; pass --overwrite to replace it.")
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            out.rename(old / "replaced")
            partial.rename(out)
            shutil.rmtree(old)
        else:
            partial.rename(out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
