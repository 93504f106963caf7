"""CPM-2-MoE: routers (`routing`, `assignment`), token dispatch (`dispatch`), the grouped
matmul with interchangeable backends (`grouped_matmul`), the MoE block (`layer`), and dense ->
MoE upcycling (`upcycle`). Importing the package registers the MoE sizes (`configs`)."""
from cpm2_jax.moe import configs  # noqa: F401  (registers cpm2_moe_* sizes)
