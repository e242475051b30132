"""Map norms (group_norm, group_norm_silu, instance_norm, batch_norm train/eval) of the selected preset."""

FAMILY = "maps"


def test_map_norm(run_benchmark, case, provider):
    run_benchmark(case, provider)
