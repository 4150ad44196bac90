"""The one index over an ONNX graph that every pass and check reads and edits: the export's passes, the
TensorRT rule checker, ort-cpu's rewrites and the search's graph signature.

It keeps producers, readers and constants (initializers and Constant nodes, whichever attribute holds the
value) in step with the edits made through it, so a pass never reads a stale index; new nodes are appended
and ``finish`` puts the graph in topological order with onnx-ir's sort (ONNX's own IR library), so no pass
computes insertion points by hand.
"""

import numpy as np
import onnx
from onnx import numpy_helper


def constant_value(node: onnx.NodeProto) -> onnx.TensorProto | None:
    """A Constant node's value as a tensor, whichever attribute holds it (``value``, ``value_float(s)``,
    ``value_int(s)``); None for a sparse or string constant."""
    for a in node.attribute:
        if a.name == "value":
            return a.t
        if a.name in ("value_float", "value_floats", "value_int", "value_ints"):
            return numpy_helper.from_array(np.array(onnx.helper.get_attribute_value(a)))
    return None


def node_attr(node: onnx.NodeProto, name: str, default=None):
    a = next((a for a in node.attribute if a.name == name), None)
    return default if a is None else onnx.helper.get_attribute_value(a)


def sort_topologically(model: onnx.ModelProto) -> None:
    """Reorder ``model``'s nodes, in place, in onnx-ir's topological order (nodes matched by first output)."""
    import onnx_ir as ir

    graph = ir.serde.deserialize_graph(model.graph)
    graph.sort()
    rank = {node.outputs[0].name: i for i, node in enumerate(graph)}
    nodes = sorted(model.graph.node, key=lambda n: rank[n.output[0]])
    del model.graph.node[:]
    model.graph.node.extend(nodes)


class Graph:
    """Producers, readers and constants of a ModelProto's main graph, and the edits that keep them in step."""

    def __init__(self, model: onnx.ModelProto):
        self.model, self.graph = model, model.graph
        self.inits = {t.name: t for t in self.graph.initializer}
        self.outputs = {o.name for o in self.graph.output}  # the passes rewrite nodes, never the graph's outputs
        self._reindex()

    # --- reading -----------------------------------------------------------------------------------------------

    def producer(self, name: str) -> onnx.NodeProto | None:
        return self._producer.get(name)

    def uses(self, name: str) -> list[tuple[onnx.NodeProto, int]]:
        """(node, input index) of every input reading ``name``, in graph order."""
        return list(self._uses.get(name, ()))

    def consumers(self, name: str) -> list[onnx.NodeProto]:
        """The nodes reading ``name``, each once."""
        out: list[onnx.NodeProto] = []
        for node, _ in self._uses.get(name, ()):
            if not any(node is o for o in out):
                out.append(node)
        return out

    def tensor(self, name: str) -> onnx.TensorProto | None:
        """The constant tensor behind ``name``: an initializer or a Constant node's value, else None."""
        tensor = self.inits.get(name)
        return tensor if tensor is not None else self._constants.get(name)

    def value(self, name: str) -> np.ndarray | None:
        tensor = self.tensor(name)
        return None if tensor is None else numpy_helper.to_array(tensor)

    # --- editing -----------------------------------------------------------------------------------------------

    def set_inputs(self, node: onnx.NodeProto, names: list[str]) -> None:
        self._unindex_inputs(node)
        node.input[:] = names
        self._index_inputs(node)

    def set_input(self, node: onnx.NodeProto, index: int, name: str) -> None:
        names = list(node.input)
        names[index] = name
        self.set_inputs(node, names)

    def replace_uses(self, old: str, new: str) -> None:
        """Every input reading ``old`` reads ``new`` instead."""
        for node in self.consumers(old):
            self.set_inputs(node, [new if i == old else i for i in node.input])

    def set_output(self, node: onnx.NodeProto, index: int, name: str) -> None:
        self._producer.pop(node.output[index], None)
        node.output[index] = name
        self._producer[name] = node

    def add(self, *nodes: onnx.NodeProto) -> list[onnx.NodeProto]:
        """Append ``nodes`` (``finish`` sorts the graph); returns the stored copies, which later edits must name."""
        self.graph.node.extend(nodes)
        stored = list(self.graph.node[len(self.graph.node) - len(nodes):])
        for node in stored:
            self._index(node)
        return stored

    def remove(self, node: onnx.NodeProto) -> None:
        self._unindex_inputs(node)
        for o in node.output:
            if self._producer.get(o) is node:
                del self._producer[o]
            self._constants.pop(o, None)
        self.graph.node.remove(node)

    def remove_unread(self, *nodes: onnx.NodeProto) -> None:
        """Remove each of ``nodes``, in order, that nothing reads any more (a graph output is read)."""
        for node in nodes:
            if not self.consumers(node.output[0]) and node.output[0] not in self.outputs:
                self.remove(node)

    def replace_initializer(self, old: str | None, tensor: onnx.TensorProto) -> None:
        if old is not None and old in self.inits:
            self.graph.initializer.remove(self.inits.pop(old))
        self.graph.initializer.append(tensor)
        self.inits[tensor.name] = self.graph.initializer[-1]

    def drop_unused(self) -> None:
        """Remove initializers and Constant nodes nothing reads any more."""
        for name in [n for n in self.inits if not self._uses.get(n) and n not in self.outputs]:
            self.graph.initializer.remove(self.inits.pop(name))
        for node in [n for n in self.graph.node if n.op_type == "Constant" and not self._uses.get(n.output[0])
                     and n.output[0] not in self.outputs]:
            self.remove(node)

    def finish(self) -> None:
        """Drop what nothing reads, then put the nodes in topological order (node objects held from before are
        no longer the graph's)."""
        self.drop_unused()
        sort_topologically(self.model)
        self._reindex()

    # --- the index ---------------------------------------------------------------------------------------------

    def _reindex(self) -> None:
        self._producer: dict[str, onnx.NodeProto] = {}
        self._uses: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
        self._constants: dict[str, onnx.TensorProto] = {}
        for node in self.graph.node:
            self._index(node)

    def _index(self, node: onnx.NodeProto) -> None:
        for o in node.output:
            self._producer[o] = node
        if node.op_type == "Constant":
            value = constant_value(node)
            if value is not None:
                self._constants[node.output[0]] = value
        self._index_inputs(node)

    def _index_inputs(self, node: onnx.NodeProto) -> None:
        for i, name in enumerate(node.input):
            if name:
                self._uses.setdefault(name, []).append((node, i))

    def _unindex_inputs(self, node: onnx.NodeProto) -> None:
        for name in set(node.input):
            if name in self._uses:
                self._uses[name] = [(n, i) for n, i in self._uses[name] if n is not node]
