"""Optional hand-written kernels. Each one has a plain torch path that runs anywhere and is tested against it;
which path runs is an explicit choice of the method's config (e.g. SPD's `method.ci_kernel`)."""
