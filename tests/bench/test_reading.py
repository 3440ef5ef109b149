from diffquant.bench.reading import pairwise, reading_text, versus_float


def _row(name, fd_ratio_ci, psnr=None, psnr_ci=None):
    return {
        "name": name,
        "fd_ratio": sum(fd_ratio_ci) / 2,
        "fd_ratio_ci": fd_ratio_ci,
        "psnr_vs_fp": psnr,
        "psnr_vs_fp_ci": psnr_ci,
        "class_accuracy": 0.99,
        "class_accuracy_ci": [0.98, 1.0],
    }


RESULTS = {
    "num_samples": 500,
    "confidence": {"level": 0.95},
    "rows": [
        _row("fp32", [1.0, 1.0]),
        _row("w4a8-rtn", [1.02, 1.2], 28.0, [27.5, 28.5]),
        _row("w4a8-gptq", [0.9, 1.1], 34.0, [33.0, 35.0]),
        _row("w4a8-qronos", [0.85, 0.95], 34.5, [33.8, 35.2]),
    ],
}


def test_only_intervals_excluding_one_are_claimed_against_float():
    worse, better, same = versus_float(RESULTS)
    assert worse.endswith("w4a8-rtn.") and better.endswith("w4a8-qronos.") and same.endswith("w4a8-gptq.")


def test_pairwise_claims_need_separated_intervals():
    lines = pairwise(RESULTS)
    gptq_rtn = next(line for line in lines if line.startswith("GPTQ vs RTN"))
    assert "w4a8-gptq is **better** than w4a8-rtn" in gptq_rtn
    qronos_gptq = next(line for line in lines if line.startswith("Qronos vs GPTQ"))
    assert "no difference shown" in qronos_gptq and "**" not in qronos_gptq
    assert not any("efficientdm" in line for line in lines)  # rows the run lacks are skipped


def test_reading_text_states_the_rule():
    text = reading_text(RESULTS)
    assert "95% paired-bootstrap intervals" in text and text.count("\n- ") == len(pairwise(RESULTS)) + 3
