"""A generated stand-in for a real third-party classifier graph (issue #15): what exporters outside PyTorch
write, built here node by node with ``onnx.helper``.

Shaped like the PaddlePaddle-exported graph measured in the issue: ai.onnx opset 11, input 3x48x192 with a
dynamic batch dimension, 35 BatchNormalization nodes whose four parameters come from ``Constant`` nodes
(not initializers), Conv weights as initializers, Conv -> BN -> Relu stacks of a PP-LCNet/MobileNet-like
recognizer (a stem, then depthwise 3x3 + pointwise 1x1 pairs, strides (2, 2) then (2, 1) in height only),
global average pooling and a Gemm classifier. No value_info (exporters often write none), so the BN inputs'
shapes are known only through shape inference.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

#: (out channels, stride) of the depthwise-separable blocks after the stem: 17 blocks, 34 BN, + stem = 35
BLOCKS: tuple[tuple[int, tuple[int, int]], ...] = (
    (32, (1, 1)),
    (64, (2, 2)),
    (64, (1, 1)),
    (128, (2, 1)),
    (128, (1, 1)),
    (128, (1, 1)),
    (256, (2, 1)),
    (256, (1, 1)),
    (256, (1, 1)),
    (256, (1, 1)),
    (256, (1, 1)),
    (256, (1, 1)),
    (512, (2, 1)),
    (512, (1, 1)),
    (512, (1, 1)),
    (512, (1, 1)),
    (512, (1, 1)),
)


def real_style_graph(
    *,
    opset: int = 11,
    height: int = 48,
    width: int = 192,
    batch: int | str | None = None,
    classes: int = 100,
    blocks: tuple[tuple[int, tuple[int, int]], ...] = BLOCKS,
    stem: int = 16,
    seed: int = 0,
    dtype: int = TensorProto.FLOAT,
) -> onnx.ModelProto:
    """The classifier graph. ``batch``: an int (static), a name (dim_param), or None (an unnamed unknown
    dimension, as many exporters write it)."""
    rng = np.random.default_rng(seed)
    np_dtype = helper.tensor_dtype_to_np_dtype(dtype)
    nodes: list[onnx.NodeProto] = []
    inits: list[TensorProto] = []
    counter = {"bn": 0, "conv": 0}

    def const(name: str, value: np.ndarray) -> str:
        nodes.append(
            helper.make_node(
                "Constant", [], [name], name=f"{name}_const", value=numpy_helper.from_array(value, name)
            )
        )
        return name

    def conv_bn_relu(x: str, c_in: int, c_out: int, k: int, stride: tuple[int, int], groups: int) -> str:
        i = counter["conv"]
        counter["conv"] += 1
        w = rng.standard_normal((c_out, c_in // groups, k, k)) * np.sqrt(2.0 / (c_in // groups * k * k))
        inits.append(numpy_helper.from_array(w.astype(np_dtype), f"conv{i}_weights"))
        pad = k // 2
        nodes.append(
            helper.make_node(
                "Conv",
                [x, f"conv{i}_weights"],
                [f"conv2d_{i}.tmp_0"],
                name=f"conv2d_{i}",
                kernel_shape=[k, k],
                strides=list(stride),
                pads=[pad, pad, pad, pad],
                group=groups,
                dilations=[1, 1],
            )
        )
        j = counter["bn"]
        counter["bn"] += 1
        params = [
            const(f"batch_norm_{j}.w_0", rng.uniform(0.5, 1.5, c_out).astype(np_dtype)),
            const(f"batch_norm_{j}.b_0", (rng.standard_normal(c_out) * 0.1).astype(np_dtype)),
            const(f"batch_norm_{j}.w_1", (rng.standard_normal(c_out) * 0.3).astype(np_dtype)),
            const(f"batch_norm_{j}.w_2", rng.uniform(0.5, 1.5, c_out).astype(np_dtype)),
        ]
        nodes.append(
            helper.make_node(
                "BatchNormalization",
                [f"conv2d_{i}.tmp_0", *params],
                [f"batch_norm_{j}.tmp_2"],
                name=f"batch_norm_{j}",
                epsilon=1e-5,
                momentum=0.9,
            )
        )
        nodes.append(
            helper.make_node("Relu", [f"batch_norm_{j}.tmp_2"], [f"relu_{j}.tmp_0"], name=f"relu_{j}")
        )
        return f"relu_{j}.tmp_0"

    h = conv_bn_relu("x", 3, stem, 3, (2, 2), 1)
    c = stem
    for c_out, stride in blocks:
        h = conv_bn_relu(h, c, c, 3, stride, c)
        h = conv_bn_relu(h, c, c_out, 1, (1, 1), 1)
        c = c_out
    nodes.append(helper.make_node("GlobalAveragePool", [h], ["pool_0.tmp_0"], name="pool2d_0"))
    nodes.append(helper.make_node("Flatten", ["pool_0.tmp_0"], ["flatten_0.tmp_0"], name="flatten_0", axis=1))
    inits.append(numpy_helper.from_array((rng.standard_normal((c, classes)) * 0.05).astype(np_dtype), "fc_w"))
    inits.append(numpy_helper.from_array(np.zeros(classes, np_dtype), "fc_b"))
    nodes.append(helper.make_node("Gemm", ["flatten_0.tmp_0", "fc_w", "fc_b"], ["logits"], name="linear_0"))
    nodes.append(helper.make_node("Softmax", ["logits"], ["softmax_0.tmp_0"], name="softmax_0", axis=1))
    dim0: int | str | None = batch
    x_info = helper.make_tensor_value_info("x", dtype, [dim0, 3, height, width])
    y_info = helper.make_tensor_value_info("softmax_0.tmp_0", dtype, [dim0, classes])
    graph = helper.make_graph(nodes, "paddle-style classifier", [x_info], [y_info], inits)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="real-style (generated)"
    )
    model.ir_version = 6 if opset <= 11 else min(model.ir_version, 10)
    onnx.checker.check_model(model, full_check=True)
    return model
