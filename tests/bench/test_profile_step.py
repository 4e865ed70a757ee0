"""bench.profile_step's product accounting: FLOPs and roles read from optimised HLO, wall split by role."""

import pytest

from bench import profile_step

# The shape of XLA's CPU dump: fused computations first, then the entry calling them.
HLO = """\
HloModule jit_step, entry_computation_layout={()->f32[]}

%fused_computation.1 (param_0.1: f32[1024,576], param_1.1: f32[576,1536]) -> f32[1024,1536] {
  %param_0.1 = f32[1024,576]{1,0} parameter(0)
  %param_1.1 = f32[576,1536]{1,0} parameter(1)
  ROOT %dot.1 = f32[1024,1536]{1,0} dot(%param_0.1, %param_1.1), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="mi,io->mo"}
}

%fused_computation.2 (param_0.2: f32[4,3,384,64], param_1.2: f32[4,3,64,256]) -> f32[4,3,384,256] {
  %param_0.2 = f32[4,3,384,64]{3,2,1,0} parameter(0)
  %param_1.2 = f32[4,3,64,256]{3,2,1,0} parameter(1)
  ROOT %dot.2 = f32[4,3,384,256]{3,2,1,0} dot(%param_0.2, %param_1.2), lhs_batch_dims={0,1}, lhs_contracting_dims={3}, rhs_batch_dims={0,1}, rhs_contracting_dims={2}
}

%fused_computation.3 (param_0.3: f32[1024,16], param_1.3: f32[16,1536]) -> f32[1024,1536] {
  %param_0.3 = f32[1024,16]{1,0} parameter(0)
  %param_1.3 = f32[16,1536]{1,0} parameter(1)
  %dot.3 = f32[1024,1536]{1,0} dot(%param_0.3, %param_1.3), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  ROOT %multiply.3 = f32[1024,1536]{1,0} multiply(%dot.3, %dot.3)
}

ENTRY %main.9 (Arg_0.1: f32[1024,576], Arg_1.2: f32[576,1536], Arg_2.3: f32[512,576], Arg_3.4: f32[49152,576]) -> f32[] {
  %Arg_0.1 = f32[1024,576]{1,0} parameter(0)
  %ynn_fusion.1 = f32[1024,1536]{1,0} fusion(%Arg_0.1, %Arg_1.2), kind=kCustom, calls=%fused_computation.1
  %ynn_fusion.2 = f32[4,3,384,256]{3,2,1,0} fusion(%a, %b), kind=kCustom, calls=%fused_computation.2
  %ynn_fusion.3 = f32[1024,1536]{1,0} fusion(%c, %d), kind=kCustom, calls=%fused_computation.3
  %dot.4 = f32[512,49152]{1,0} dot(%Arg_2.3, %Arg_3.4), lhs_contracting_dims={1}, rhs_contracting_dims={1}
  ROOT %add_fusion = f32[] fusion(%dot.4), kind=kLoop, calls=%fused_computation.9
}
"""  # noqa: E501  (HLO text as XLA prints it)


def test_product_costs_reads_flops_and_roles_from_hlo():
  costs = profile_step.product_costs(HLO)
  assert costs["ynn_fusion.1"] == (2.0 * 1024 * 576 * 1536, "layer products")
  assert costs["ynn_fusion.2"] == (2.0 * 12 * 384 * 64 * 256, "attention")
  assert costs["ynn_fusion.3"] == (2.0 * 1024 * 16 * 1536, "adapter factors")
  assert costs["dot.4"] == (2.0 * 512 * 576 * 49152, "LM head")  # an unfused dot counts under its own name
  assert "add_fusion" not in costs


def test_by_role_splits_overlapping_wall_time_equally():
  costs = {"ynn_fusion.1": (2e9, "layer products"), "ynn_fusion.3": (1e8, "adapter factors")}
  ms = 1_000_000
  events = [  # (kernel, hlo op, start ns, duration ns, scope), one step
    ("k", "ynn_fusion.1", 0, 10 * ms, ""),  # alone for 6 ms, then beside the adder for 4
    ("k", "add_fusion", 6 * ms, 4 * ms, ""),
    ("k", "ynn_fusion.3", 20 * ms, 2 * ms, ""),
  ]
  roles = profile_step.by_role(events, costs, steps=1)
  assert roles["layer products"] == pytest.approx((8.0, 2.0))  # 6 ms alone + half of the 4 shared
  assert roles["no product"] == pytest.approx((2.0, 0.0))  # the adder's half
  assert roles["adapter factors"] == pytest.approx((2.0, 0.1))
  assert sum(ms for ms, _ in roles.values()) == pytest.approx(12.0)  # the busy time
  table = profile_step.format_roles(roles)
  assert "layer products" in table.splitlines()[1] and table.splitlines()[1].split()[-1] == "250"  # GFLOP/s of wall


def test_format_op_walls_ranks_ops_by_their_share_of_wall_time():
  costs = {"ynn_fusion.1": (2e9, "layer products")}
  ms = 1_000_000
  events = [  # two steps of: a product, 4 ms of it beside a loop
    ("k", "ynn_fusion.1", 0, 10 * ms, "mi,io->mo"),
    ("k", "add_fusion", 6 * ms, 4 * ms, "silu"),
    ("k", "ynn_fusion.1", 20 * ms, 10 * ms, "mi,io->mo"),
    ("k", "add_fusion", 26 * ms, 4 * ms, "silu"),
  ]
  assert profile_step.wall_by_op(events) == {
    "ynn_fusion.1": pytest.approx(16 * ms),
    "add_fusion": pytest.approx(4 * ms),
  }
  rows = profile_step.format_op_walls(events, costs, steps=2, top=5).splitlines()[2:]
  product, loop = rows[0].split(), rows[1].split()
  assert product[:4] == ["8.00", "10.00", "1", "layer"] and product[5] == "250"  # 2 GFLOP in 8 ms of wall
  assert loop[:4] == ["2.00", "4.00", "1", "no"] and loop[-2:] == ["add_fusion", "silu"]
