"""Row norms (layer_norm, rms_norm, add_layer_norm, add_rms_norm) of the selected preset, per provider."""

FAMILY = "rows"


def test_row_norm(run_benchmark, case, provider):
    run_benchmark(case, provider)
