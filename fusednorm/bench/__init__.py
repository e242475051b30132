"""``fusednorm-bench``: the kernel microbenchmark (also ``python -m fusednorm.bench``).

Where things live (read in this order):

- ``cases.py``      what is measured: ``Case`` (op, shape, dtype, mode, layout), the op table ``OPS`` (how to
                    build inputs and call each op through a functional namespace), dtype and mode names.
- ``presets.py``    named lists of cases (``default``, ``cpu``, ``llm``, ``diffusion``, ``resnet``, ``tiny``).
- ``bytes_model.py`` the explicit per-op, per-mode byte model behind every GB/s number.
- ``providers.py``  who is measured: fusednorm triton/native, torch eager, torch.compile and installed peers;
                    each says why it is skipped when it cannot run.
- ``timing.py``     warm-up + median/spread timer (CUDA events on GPU), input rotation, copy bandwidth, peak
                    extra memory.
- ``runner.py``     per case: build inputs once, check every provider against a float64 torch-eager
                    reference (a wrong answer is FAILED, never timed), then time the survivors.
- ``report.py``     terminal table (rich), CSV, JSON (with environment), matplotlib plot, ``--kernels`` table.
- ``cli.py``        argument parsing and the ``main`` entry point.

Nothing here is imported by ``import fusednorm``.
"""
