"""A graph pass for the compiled decode step: quantized products that share an input run as one.

A layer's q, k and v projections read the same normed input, and so do the feed-forward's w1 and
w3. In the compiled graph each is one call of camelid's kernel; this pass (run by inductor after
its own, `post_grad_custom_post_pass`) replaces each such set with one `*_gemv_many` call, which
splits the outputs of all of them among the threads at once: fewer calls per token (each call
has a fixed cost) and no thread left idle on a small projection such as k or v. The model and
the layers stay as they are; only the compiled graph changes (docs/cpu-kernels.md has the
measurements).
"""

from __future__ import annotations

import operator
from collections import defaultdict

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

from camelid.quant import kernels


def _ops():
    ops = torch.ops.camelid
    return {
        # single op -> (the op for several weights, tensor arguments per weight)
        ops.int4_gemv.default: (ops.int4_gemv_many.default, 3),
        ops.int8_gemv.default: (ops.int8_gemv_many.default, 2),
    }


class FuseSharedInputProducts(CustomGraphPass):
    def __call__(self, graph: torch.fx.Graph) -> None:
        if not kernels.loaded():  # no quantized layer calls them
            return
        ops = _ops()
        sets: dict[tuple, list[torch.fx.Node]] = defaultdict(list)
        for node in graph.nodes:
            if node.op == "call_function" and node.target in ops:
                per_weight = ops[node.target][1]
                # same op, same input, same trailing arguments (group size, activation rounding)
                sets[(node.target, node.args[0], *node.args[1 + per_weight:])].append(node)
        for (target, x, *rest), nodes in sets.items():
            if len(nodes) > 1:
                _fuse(graph, ops[target], x, rest, nodes)
        graph.lint()

    def uuid(self) -> bytes:
        return get_hash_for_files((__file__,))


def _fuse(graph: torch.fx.Graph, many: tuple, x: torch.fx.Node, rest: list, nodes: list[torch.fx.Node]) -> None:
    op, per_weight = many
    # the weights are graph inputs, defined before the first of the products
    weights = [[n.args[1 + i] for n in nodes] for i in range(per_weight)]
    with graph.inserting_before(nodes[0]):
        fused = graph.call_function(op, (x, *weights, *rest))
        fused.meta["val"] = [n.meta["val"] for n in nodes]
        for i, node in enumerate(nodes):
            item = graph.call_function(operator.getitem, (fused, i))
            item.meta["val"] = node.meta["val"]
            node.replace_all_uses_with(item)
    for node in nodes:
        graph.erase_node(node)
