"""fusedopt under FSDP2 (DTensor params), torch.distributed.checkpoint, DDP (with and without
bucket views) and ZeroRedundancyOptimizer: CPU, gloo, 2 processes on 127.0.0.1.

The processes are started once for all the tests selected here and run their scenarios in one
process group (see dist_harness); each test reports its scenario, and what each scenario checks
and why its tolerances hold is in dist_scenarios.
"""

import pytest
import torch.distributed as dist

import fusedopt

pytestmark = [
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo"),
    pytest.mark.skipif(not fusedopt.extension_available(), reason="needs the compiled extension"),
]

NAMES = [
    "fsdp2_matches_torch",
    "hsdp_2d_mesh_matches_torch",
    "replicate_placement_matches_torch",
    "fsdp2_empty_local_shard_advances_steps",
    "fsdp2_grad_scaler_agrees_to_skip",
    "fsdp2_in_kernel_schedule",
    "fsdp2_local_tensors_replaced",
    "fsdp2_grads_read_in_cpp",
    "dcp_resume_is_bitwise",
    "dcp_torch_checkpoint_into_fusedopt",
    "dcp_fusedopt_checkpoint_into_torch",
    "ddp_matches_torch",
    "ddp_bucket_view_matches_torch",
    "zero_matches_torch",
    "bad_grad_placements",
    "bad_plain_tensor_next_to_dtensor",
]


@pytest.fixture(scope="module")
def outcomes(request, tmp_path_factory):
    """Runs the scenarios of every selected test of this module, once, in 2 processes."""
    import dist_harness

    wanted = [item.callspec.params["name"] for item in request.session.items
              if item.module is request.module and hasattr(item, "callspec")]
    names = [n for n in NAMES if n in wanted] or NAMES
    return dist_harness.run_scenarios(names, str(tmp_path_factory.mktemp("dist")), world_size=2)


@pytest.mark.parametrize("name", NAMES)
def test_scenario(name, outcomes):
    for rank, results in enumerate(outcomes):
        res = results.get(name)
        assert res is not None, f"rank {rank} did not run {name} (it crashed or hung earlier)"
        assert res["ok"], f"rank {rank}:\n{res['error']}"


def test_every_scenario_is_listed():
    import dist_scenarios

    assert sorted(dist_scenarios.SCENARIOS) == sorted(NAMES)
