"""Every argument of ``quantize`` / ``calibrate`` is checked before a model is loaded: exit 2 with a
message that says what to do, and nothing loaded or written."""

import diffusers
import pytest

from diffquant.cli import main
from diffquant.models.tiny import tiny_unet2d

from .conftest import SD_RUN


@pytest.fixture
def no_loading(monkeypatch):
    """Loading a pipeline or a model fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", refuse)
    monkeypatch.setattr(diffusers.ModelMixin, "from_pretrained", refuse)


def _cases(sd, prompts, tmp):
    empty = tmp / "empty.txt"
    empty.write_text("# only a comment\n\n")
    (tmp / "full").mkdir()
    (tmp / "full" / "keep.txt").write_text("keep")
    (tmp / "a-file").write_text("x")
    tiny_unet2d().save_pretrained(tmp / "unet2d")
    quantize = ["quantize", str(sd), "--prompts", str(prompts), "--out", str(tmp / "q"), *SD_RUN]
    calibrate = ["calibrate", str(sd), "--prompts", str(prompts), *SD_RUN, "--save_path"]
    gptq = ["quantize", str(sd), "--method", "gptq", "--out", str(tmp / "q")]
    return [
        ("activation-spec", [*quantize, "--activations", "int8"], "expected 'none' or INTn-MODE"),
        ("activation-mode", [*quantize, "--activations", "int4-snr"], "unknown mode 'snr'"),
        ("activation-bits", [*quantize, "--activations", "int12-static"], "2..8"),
        (
            "nf4-with-int-flags",
            [*quantize, "--weights", "nf4", "--group-size", "64"],
            "NF4 takes --block-size",
        ),
        ("gptq-without-prompts", gptq, "pass --prompts FILE"),
        ("missing-prompts", [*gptq, "--prompts", str(tmp / "nope.txt")], "no such file"),
        ("empty-prompts", [*gptq, "--prompts", str(empty)], "holds no prompt"),
        ("out-is-input", [*quantize[:-6], "--out", str(sd)], "overlaps the input folder"),
        ("out-inside-input", [*quantize, "--out", str(sd / "quantized")], "overlaps the input folder"),
        ("out-not-empty", [*quantize, "--out", str(tmp / "full")], "pass --overwrite"),
        ("out-is-a-file", [*quantize, "--out", str(tmp / "a-file")], "existing file"),
        ("out-not-writable", [*quantize, "--out", str(tmp / "a-file" / "q")], "cannot write in"),
        ("unknown-pipe-arg", [*quantize, "--pipe-arg", "num_frames=3"], "not an argument of this pipeline"),
        ("reserved-pipe-arg", [*quantize, "--pipe-arg", "num_inference_steps=3"], "use --steps"),
        ("bad-pipe-arg", [*quantize, "--pipe-arg", "height"], "expected KEY=VALUE"),
        ("no-such-component", [*quantize, "--component", "text_encoder"], "choose one of ['unet']"),
        ("not-a-pipeline", ["quantize", str(tmp), "--out", str(tmp / "q")], "has no config.json"),
        ("calibrated-model-folder", [*gptq[:1], str(tmp / "unet2d"), *gptq[2:]], "give the pipeline folder"),
        (
            "prompts-for-a-model",
            ["quantize", str(tmp / "unet2d"), "--out", str(tmp / "q"), "--prompts", str(prompts)],
            "--prompts configure the calibration run of a pipeline",
        ),
        ("subfolder-calibrated", [*gptq, "--subfolder", "unet", "--prompts", str(prompts)], "no --subfolder"),
        ("save-path-file", [*calibrate, str(tmp / "logsnr_checkpoints.pt")], "give a folder such as"),
        ("wbits", [*calibrate, str(tmp / "q"), "--wbits", "16"], "--wbits '16': choose 2..8"),
        (
            "digits-on-cuda",
            ["quantize", "digits", "--out", str(tmp / "q"), "--device", "cuda"],
            "drop --device",
        ),
        (
            "limit-for-a-model",
            [
                "quantize",
                str(sd),
                "--subfolder",
                "unet",
                "--out",
                str(tmp / "q"),
                "--calibration-prompts-limit",
                "2",
            ],
            "--calibration-prompts-limit configure the calibration run",
        ),
    ]


def test_bad_arguments_exit_2_before_anything_is_loaded(
    saved_pipeline, prompts, tmp_path, no_loading, capsys
):
    sd = saved_pipeline("sd")
    failures = []
    for name, argv, message in _cases(sd, prompts, tmp_path):
        try:
            code = main(argv)
        except AssertionError as err:  # loaded
            failures.append(f"{name}: {err}")
            continue
        err = capsys.readouterr().err
        if code != 2 or message not in err:
            failures.append(f"{name}: exit {code}, stderr {err!r}")
    assert not failures, "\n".join(failures)
    assert not (tmp_path / "q").exists() and not (sd / "quantized").exists()
    assert (tmp_path / "full" / "keep.txt").read_text() == "keep"


def test_prompt_limit_and_pipeline_arguments_reach_the_calibration_run(
    saved_pipeline, prompts, tmp_path, monkeypatch
):
    """--calibration-prompts-limit, --steps, --seed and --pipe-arg arrive in the quantize_pipeline call."""
    import diffquant.integrations.pipeline as pipeline_module

    seen = {}

    def record(pipe, config, **kwargs):
        seen.update(kwargs)
        raise ValueError("stop here")

    monkeypatch.setattr(pipeline_module, "quantize_pipeline", record)
    argv = ["quantize", str(saved_pipeline("sd")), "--prompts", str(prompts), "--out", str(tmp_path / "q")]
    argv += ["--method", "gptq", "--calibration-prompts-limit", "1", "--seed", "3", "--pipe-arg", "eta=0.5"]
    assert main([*argv, *SD_RUN, "--guidance-scale", "1.5"]) == 2
    assert seen["prompts"] == ("a cat",) and seen["num_inference_steps"] == 2 and seen["seed"] == 3
    assert seen["eta"] == 0.5 and seen["guidance_scale"] == 1.5 and seen["height"] == 16
    assert seen["progress"] is True and seen["component"] == "unet"
    assert not (tmp_path / "q").exists()
