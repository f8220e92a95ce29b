"""Hook specifications: what a plugin may implement. Signatures only."""

import pluggy

hookspec = pluggy.HookspecMarker("fmkit")
hookimpl = pluggy.HookimplMarker("fmkit")


@hookspec
def register_backbones(register):
    """Register backbones: register(name, factory); factory(*, image_size, channels, [data,]
    **options) -> nn.Module called as model(x, t) or, with conditions, model(x, t, cond)."""


@hookspec
def register_datasets(register):
    """Register datasets: register(name, factory); factory(*, root, image_size, split,
    [condition,] **options)."""


@hookspec
def register_paths(register):
    """Register probability paths: register(name, factory); factory(**options) -> ProbabilityPath."""


@hookspec
def register_objectives(register):
    """Register training objectives: register(name, factory); factory(*, path, **options) ->
    Objective."""


@hookspec
def register_solvers(register):
    """Register ODE solvers: register(name, factory); factory(**options) -> Solver."""


@hookspec
def register_conditions(register):
    """Register condition kinds: register(name, factory); factory() -> ConditionKind."""


@hookspec
def register_metrics(register):
    """Register sample-quality metrics: register(name, factory); factory() -> Metric."""


@hookspec
def register_exporters(register):
    """Register export formats: register(name, factory); factory(**options) -> Exporter."""


@hookspec
def register_spaces(register):
    """Register spaces a model can generate in: register(name, factory); factory(**options) ->
    Space."""


@hookspec
def register_commands(cli):
    """Add commands to the fmkit click group `cli`."""
