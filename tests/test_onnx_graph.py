"""The one graph index: edits keep producers, readers and constants in step; finish() sorts topologically."""

import numpy as np
import onnx
from onnx import helper, numpy_helper

from pomq_deploy.onnx_graph import Graph


def _model():
    nodes = [helper.make_node("Constant", [], ["c"], value_float=2.0),
             helper.make_node("Mul", ["x", "c"], ["y"], name="mul"),
             helper.make_node("Relu", ["y"], ["z"], name="relu")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, [2])],
                              [numpy_helper.from_array(np.float32([1, 2]), "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def test_edits_keep_the_index_and_finish_sorts():
    model = _model()
    g = Graph(model)
    assert g.value("c").tolist() == 2.0 and g.value("w").tolist() == [1.0, 2.0] and g.value("x") is None
    mul, relu = g.producer("y"), g.producer("z")
    assert g.uses("y") == [(relu, 0)] and g.consumers("x") == [mul]
    # insert Add(y, w) between Mul and Relu, appended at the end of the node list
    (add,) = g.add(helper.make_node("Add", ["y", "w"], ["y2"], name="add"))
    g.replace_uses("y", "y2")
    g.set_input(add, 0, "y")  # replace_uses rewired the Add's own input too: point it back
    assert [n.name for n in g.consumers("y")] == ["add"] and [n.name for n in g.consumers("y2")] == ["relu"]
    assert [n.name for n in model.graph.node] == ["", "mul", "relu", "add"]  # not yet in order
    g.finish()
    assert [n.op_type for n in model.graph.node] == ["Constant", "Mul", "Add", "Relu"]
    onnx.checker.check_model(model, full_check=True)
    g.remove(g.producer("z"))
    assert g.producer("z") is None and g.consumers("y2") == []
    g.drop_unused()  # y2 has no reader now, but only initializers and Constants are dropped: "w" is still read
    assert "w" in g.inits and [n.op_type for n in model.graph.node] == ["Constant", "Mul", "Add"]
