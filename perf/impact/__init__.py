"""Impact study: measure the usual claims about batch normalization on real data.

`tritonbn-perf impact` trains a small CNN and an MLP on scikit-learn's bundled handwritten digits, once with
tritonbn's fused BatchNormAct modules and once without batch norm (plain conv/linear with bias + ReLU, and
optionally the plain net with dropout), sweeping learning rates, initialisation scales and seeds; for claim 5
it also trains BN nets with noise injected after every BN (Santurkar et al., NeurIPS 2018) and probes the loss
landscape along the training path. It then measures each of five claims and decides a verdict per claim from
the numbers with the rules in `claims.RULES`:

1. BN makes training less sensitive to initialisation;
2. BN acts as a regulariser;
3. BN allows higher learning rates and speeds up convergence;
4. BN adds computational overhead;
5. BN works by reducing internal covariate shift (ICS): 5a by correlation (ICS beside speed), 5b by
   intervention (does BN's speed survive noise that raises ICS?).

Which BN path runs: on CUDA the fused Triton kernels; on CPU the plain PyTorch reference path, even when
TRITON_INTERPRET=1 is set (the test session sets it), because training through the Triton interpreter
takes minutes per run. `--kernels` asks for the interpreter on CPU anyway. The path that really ran is
written to impact.md.

Modules, in the order a study uses them: `config` (the settings), `data` (the digits), `models` (the nets),
`noise` (the noise injected after BN), `training` (one run, and the step timing), `covariate_shift` (the ICS
measurement), `landscape` (the loss-landscape probe), `study` (every run, then the analysis and the report),
`claims` (the measured figures and the verdict rules), `report` (impact.md, results.json) and `plots` (the
figures); `cli` holds the subcommand's flags. Importing this package imports none of them.
"""
