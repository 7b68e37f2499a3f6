"""The Triton releases the package supports (kernels/toolchain.py): what differs between them and what a
release outside the range gets. CI runs this file under each of Triton 3.6.0, 3.7.1, 3.8.0 and 3.9.0;
the tests that read the installed Triton's own launcher check the one installed."""
import inspect
import warnings
from collections import namedtuple
from pathlib import Path

import pytest
import torch
import triton

import tritonrnn
from tritonrnn.kernels import configs, launch, persistent, toolchain
from tritonrnn.kernels.occupancy import ClusterUnavailable, Plan


def test_versions_parse_as_pip_and_local_builds_write_them():
    assert toolchain.parse("3.9.0") == (3, 9, 0)
    assert toolchain.parse("3.8.0+git1a2b3c4d") == (3, 8, 0)
    assert toolchain.parse("3.10") == (3, 10, 0)
    assert toolchain.supported((3, 6, 0)) and toolchain.supported((3, 9, 4))
    assert not toolchain.supported((3, 5, 1)) and not toolchain.supported((3, 10, 0))


def test_installed_triton_is_in_the_supported_range():
    """CI installs each supported release in turn: each must be inside the declared range."""
    assert toolchain.supported(), toolchain.unsupported_message()
    assert toolchain.layouts()["cluster"] == ""


def test_old_interpreter_with_new_numpy_is_one_line_naming_the_fix():
    problem = toolchain.interpreter_problem((3, 6, 0), (2, 4, 6))
    assert "numpy<2.4" in problem and "3.7" in problem and "\n" not in problem
    assert toolchain.interpreter_problem((3, 7, 1), (2, 4, 6)) == ""
    assert toolchain.interpreter_problem((3, 6, 0), (2, 3, 5)) == ""


def test_layers_refuse_an_interpreter_that_cannot_run(monkeypatch):
    """Triton 3.6's interpreter with numpy 2.4 fails inside every kernel with "only 0-dimensional
    arrays can be converted to Python scalars": the layer says why first."""
    from tritonrnn import dispatch

    if dispatch.backend(torch.device("cpu")) != "triton-interpreter":
        pytest.skip("the kernels run compiled here")
    assert dispatch._INTERPRETER_PROBLEM == toolchain.interpreter_problem()  # read at import
    message = toolchain.interpreter_problem((3, 6, 0), (2, 4, 6))
    monkeypatch.setattr(dispatch, "_INTERPRETER_PROBLEM", message)
    with pytest.raises(RuntimeError, match=r"pip install 'numpy<2\.4'"):
        tritonrnn.RNN(3, 4)(torch.randn(2, 1, 3))


def test_a_triton_outside_the_range_warns_once(monkeypatch):
    monkeypatch.setattr(triton, "__version__", "3.10.0")
    toolchain.warn_if_unsupported.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match=r"Triton 3\.10\.0 is newer .*\(3\.6\.0 to 3\.9\.x\)"):
            toolchain.warn_if_unsupported()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            toolchain.warn_if_unsupported()  # once a process
    finally:
        toolchain.warn_if_unsupported.cache_clear()


class RecordingLaunch:
    """A stand-in for a compiled kernel whose `run` is Triton's launcher: records what it is given."""

    def __init__(self, num_warps=4, num_ctas=1, shared=49152, **scratch):
        fields = dict(num_warps=num_warps, num_ctas=num_ctas, shared=shared, **scratch)
        self.metadata = namedtuple("Metadata", fields)(**fields)
        self.function = object()
        self.calls = []

    def launch_metadata(self, grid, stream, *values):
        return ("launch-metadata", grid)

    def run(self, grid_x, grid_y, grid_z, stream, function, packed, launch_metadata, enter_hook, exit_hook, *values):
        assert function is self.function and launch_metadata == ("launch-metadata", (grid_x, grid_y, grid_z))
        self.calls.append(((grid_x, grid_y, grid_z), packed, values))


class FakeDriver:
    def get_current_device(self):
        return 0

    def get_current_stream(self, device):
        return 7


def _launched_ctas(call) -> tuple:
    """What Triton's launcher makes of a run: CTAs (gridX * num_ctas, gridY, gridZ) in clusters of
    (num_ctas, 1, 1) (cuLaunchKernelEx's gridDimX and clusterDim, as its source below sets them)."""
    (grid_x, grid_y, grid_z), (_, num_ctas, _), _ = call
    return (grid_x * num_ctas, grid_y, grid_z), (num_ctas, 1, 1)


@pytest.mark.parametrize("size, clusters, directions", [(4, 3, 1), (16, 2, 2), (3, 1, 2)])
def test_cluster_launch_runs_the_programs_the_counter_form_runs(monkeypatch, size, clusters, directions):
    """The cluster launch hands Triton's launcher a grid, metadata and arguments such that the CTAs it
    launches are exactly the plan's programs (the grid the counter form runs, which the CPU tests check
    against float64), grouped in clusters of the plan's size along x, with every argument in order.
    A permuted grid (say (clusters, 1, directions)) fails here."""
    monkeypatch.setattr(triton.runtime.driver, "_active", FakeDriver())
    chosen = Plan(size, clusters, batch_tiles=1, resident_capacity=clusters * directions * size,
                  directions=directions, cluster=True)
    compiled = RecordingLaunch(num_warps=8)
    values = [f"argument {i}" for i in range(len(persistent.rnn_persistent_kernel.fn.arg_names))]
    launch.launch_clusters(compiled, chosen, values)
    (call,) = compiled.calls
    ctas, cluster_dims = _launched_ctas(call)
    assert ctas == chosen.grid and cluster_dims == chosen.cluster_dims
    assert call[1] == (8, size, 49152)
    assert list(call[2]) == values


@pytest.mark.parametrize("directions, lengths", [(1, False), (2, True)])
def test_a_cluster_recurrence_hands_the_launcher_the_plan_and_every_argument(monkeypatch, directions, lengths):
    """The GPU branch of the cluster layout's launch (kernels.launch._launch_clusters_of: compile, resident
    clusters, plan, launch), which no CPU runs, against a recording launcher: the kernel compiled with the
    cluster barrier and no sync words, the CTAs launched are the plan's (clusters of cdiv(H, BLOCK_N) along x,
    groups, directions) and every kernel argument reaches the launcher in parameter order, the heuristics'
    flag and the plan's batch tiles included."""
    monkeypatch.setattr(triton.runtime.driver, "_active", FakeDriver())
    monkeypatch.setattr(launch, "cluster_refusal", lambda device: None)
    monkeypatch.setattr(launch.occupancy, "resident_clusters", lambda compiled, size, device: 2)
    compiled, compiles = RecordingLaunch(num_warps=4), []
    monkeypatch.setattr(launch.rnn_persistent_kernel, "warmup",
                        lambda **kwargs: compiles.append(kwargs) or compiled, raising=False)
    T, B, H = 3, 40, 48  # BLOCK_N 16: clusters of 3 CTAs; 3 batch tiles of 16 rows
    xw = torch.randn(directions, T, B, H)
    out = torch.empty_like(xw)
    p_len = torch.full((B,), T, dtype=torch.int32) if lengths else None
    meta = {"BLOCK_B": 16, "BLOCK_N": 16, "K_SPLIT": 1, "num_warps": 4, "num_stages": 1}
    args = launch.kernel_arguments(p_in=xw, p_w=torch.randn(directions, H, H), p_act=None, p_out=out,
                                   p_ring=torch.zeros(directions, 2, B, H), p_hn=out[:, 0], p_len=p_len, T=T, B=B,
                                   H=H, backward=False, reverse=False, cell="tanh",
                                   numerics=launch.numerics(torch.float32, torch.device("cuda"), True), meta=meta,
                                   timer=True)
    chosen = launch._launch_clusters_of(args, torch.device("cuda"), 1.0)
    (compile_args,) = compiles
    assert compile_args["BARRIER"] == "cluster" and compile_args["p_sync"] is None
    groups, batch_tiles = {1: (2, 2), 2: (1, 3)}[directions]  # 2 resident clusters for 3 batch tiles
    assert chosen == Plan(3, groups, batch_tiles, 6, directions, cluster=True)
    (call,) = compiled.calls
    ctas, cluster_dims = _launched_ctas(call)
    assert ctas == chosen.grid == (3, chosen.groups, directions) and cluster_dims == (3, 1, 1)
    assert call[1] == (4, 3, 49152)
    names = persistent.rnn_persistent_kernel.fn.arg_names
    values = dict(zip(names, call[2], strict=True))
    assert values["p_in"] is xw and values["p_out"] is out and values["p_len"] is p_len and values["p_sync"] is None
    assert values["BATCH_TILES"] == chosen.batch_tiles and values["HAS_LENGTHS"] == lengths
    assert values["BARRIER"] == "cluster" and values["BLOCK_N"] == 16 and values["H"] == H and values["T"] == T
    assert values["DEBUG_WAIT_SLACK"] == 0 and values["DEBUG_ABSENT"] == -1  # the defaults, in their places


def test_cluster_launch_refuses_a_kernel_with_global_scratch(monkeypatch):
    """Triton's launcher sizes global scratch by the compiled num_ctas (1), not by the cluster."""
    monkeypatch.setattr(triton.runtime.driver, "_active", FakeDriver())
    compiled = RecordingLaunch(global_scratch_size=256)
    with pytest.raises(ClusterUnavailable, match="global scratch"):
        launch.launch_clusters(compiled, Plan(4, 1, 1, 4, cluster=True), [])
    assert compiled.calls == []


def test_an_unchecked_triton_refuses_the_cluster_launch_and_the_layout(monkeypatch):
    """On a release whose launcher was not checked the cluster launch is refused before it runs
    (ClusterUnavailable, which the op answers with the dispatcher's next layout), and cluster_refusal says
    why, so the dispatcher never takes the cluster layout there and names the layout that runs."""
    monkeypatch.setattr(triton.runtime.driver, "_active", FakeDriver())
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    gpu = torch.device("cuda", 0)
    assert launch.cluster_refusal(gpu) is None
    monkeypatch.setattr(triton, "__version__", "3.10.0")
    assert "Triton's launcher" in toolchain.layouts()["cluster"]
    assert "this is 3.10.0" in launch.cluster_refusal(gpu)
    compiled = RecordingLaunch()
    with pytest.raises(ClusterUnavailable, match="checked on Triton 3.6, 3.7, 3.8, 3.9; this is 3.10.0"):
        launch.launch_clusters(compiled, Plan(4, 1, 1, 4, cluster=True), [])
    assert compiled.calls == []


def _launcher_source() -> str:
    """The installed Triton's CUDA launcher: driver.c (3.7 and later) or the template in driver.py (3.6)."""
    folder = Path(inspect.getfile(triton)).parent / "backends" / "nvidia"
    c_source = folder / "driver.c"
    text = (folder / "driver.py").read_text()
    return (c_source.read_text() if c_source.exists() else "") + text


def test_installed_launcher_takes_what_the_cluster_launch_hands_it():
    """The contract the cluster launch relies on, read from the installed Triton: CompiledKernel.run
    is the CUDA launcher, called (gridX, gridY, gridZ, stream, function, packed metadata, launch
    metadata, enter hook, exit hook, *arguments); the packed metadata is (num_warps, num_ctas, shared);
    the launcher multiplies grid x by num_ctas and makes clusters of (num_ctas, 1, 1), allowing 16."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.driver import CudaLauncher
    from triton.compiler.compiler import make_backend

    parameters = list(inspect.signature(CudaLauncher.__call__).parameters)
    assert parameters[:6] == ["self", "gridX", "gridY", "gridZ", "stream", "function"]
    # 3.7 and later name the rest; 3.6 takes them as *args, in the same order (its C template parses them)
    assert parameters[6:] in (["kernel_metadata", "launch_metadata", "launch_enter_hook", "launch_exit_hook", "args"],
                              ["args"])
    meta = namedtuple("Meta", "num_warps num_ctas shared")(8, 1, 49152)
    assert make_backend(GPUTarget("cuda", 90, 32)).pack_metadata(meta) == (8, 1, 49152)
    source = _launcher_source()
    assert "(iii)" in source or '"iii"' in source.replace('\\"', '"')  # the packed metadata: three ints
    assert "gridDimX = gridX * num_ctas" in source
    assert "clusterDim.x = num_ctas" in source and "clusterDim.y = 1" in source and "clusterDim.z = 1" in source
    assert "num_ctas == 16" in source and "NON_PORTABLE_CLUSTER_SIZE_ALLOWED" in source


def test_info_names_the_versions_and_the_layouts(capsys):
    from tritonrnn import cli

    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"triton    {triton.__version__} (supported: {toolchain.SUPPORTED})" in out
    assert "cuDNN" in out and "layouts   sequence, persistent, cluster, streamed, stepwise" in out
    assert tuple(toolchain.layouts()) == configs.LAYOUTS  # every layout, in the dispatcher's order


def test_offline_plan_names_the_triton_of_its_resource_table(capsys):
    import json

    from tritonrnn import cli, costmodel

    assert cli.main(["info", "--offline", "h100", "--hidden-size", "256", "--batch", "16", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()][1:]  # after the constants
    assert {row["resources_triton"] for row in rows} == {costmodel.resource_table_triton()}
    assert costmodel.resource_table_triton() == json.loads(
        (costmodel.OFFLINE_DIR / "sm_90.json").read_text())["triton"]
