"""InfMoE: inference of an MoE model whose experts live in host memory (CPM2_FACTS "InfMoE").

split_moe (route / per-expert compute with weights as arguments / combine), stepped (the model
run layer by layer from the host), schedule (the InfMoE order, pure), store (packed host
experts, device slots, the link), runner (loads and computations overlapped), plan.
"""
