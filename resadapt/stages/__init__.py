"""One module per DVC stage (prepare, backbone, train, ablation, evaluate, figures): what that stage does, as
functions of the validated params that its notebook calls, plus the stage's tables and figures.

The core library (every `resadapt` module outside this package and `cli`) never imports a stage module, and
`dvc.yaml` declares for each stage exactly the `resadapt` modules its notebook imports, directly or not
(`tests/test_layout.py` checks both).
"""
