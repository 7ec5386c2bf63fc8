"""`foldfed gate`: a participant's readiness self-test for the coming cycle.

`checks` judges measurements (pure: each check's pass, fail or skip, its measured value and,
on failure, the fix in one sentence); `record` turns the results into a signed readiness
record (a DSSE envelope, pure); `probes` measures (broker, clock, disk, compute, data,
θ0: the I/O); `run` ties them together, writes the record and publishes it; `commands` is
the command line. docs/operating-model.md, "Readiness gating", says what each check means.
"""
