"""Linear4bit's state_dict in bitsandbytes' layout, loaded all or nothing (lesson 07; the
layout itself is bnb_layout.py, read key by key in lesson 10).

    state_dict():       weight (the bytes, (ceil(n/2), 1)), bias, weight.absmax, weight.quant_map,
                        [weight.nested_absmax, weight.nested_quant_map], weight.quant_state.*
    load_state_dict():  every key of the layer checked first (bnb_layout.state_from_dict and
                        the layer's shape), then taken; after any error the layer is as it was

A checkpoint written here loads in bitsandbytes and Transformers and back. A load takes the
checkpoint's format (quant_type, blocksize, nesting, dtype) but refuses another shape.

Worked example: a (8, 64) NF4 layer without bias, not nested, saves 4 keys: weight (256, 1)
uint8, weight.absmax (8,) float32, weight.quant_map (16,) and the JSON bytes of
weight.quant_state.bitsandbytes__nf4; loading them into a (8, 32) layer raises "size
mismatch for weight" and leaves it untouched.

BnbStateDict is a mixin: the layer supplies in_features, out_features, bias, weight_packed,
quant_state() and _set_state(packed, state) (linear4bit.py).
"""
import torch

from .bnb_layout import state_as_dict, state_from_dict


class BnbStateDict:
    """state_dict() / load_state_dict() of a 4-bit layer in bitsandbytes' keys and order."""

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        """bitsandbytes' keys and order: weight, bias, weight.absmax, ... (bnb_layout.py)."""
        tensors = state_as_dict(self.weight_packed, self.quant_state(), prefix + "weight")
        destination[prefix + "weight"] = tensors.pop(prefix + "weight")
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()
        destination.update(tensors)

    def parse_state_dict(self, state_dict, prefix: str = "") -> tuple:
        """(packed, QuantState, bias or None) from this layer's keys in state_dict, checked
        against the layer's shape; a ValueError naming the key otherwise. Changes nothing."""
        name = prefix + "weight"
        weight = {k: v for k, v in state_dict.items() if k == name or k.startswith(name + ".")}
        packed, state = state_from_dict(weight, name)
        if state.shape != (self.out_features, self.in_features):
            raise ValueError(f"size mismatch for {name}: the checkpoint's weight has shape "
                             f"{list(state.shape)}, this layer's is "
                             f"{[self.out_features, self.in_features]} (out, in)")
        bias = state_dict.get(prefix + "bias")
        if bias is not None and self.bias is not None and bias.shape != self.bias.shape:
            raise ValueError(f"size mismatch for {prefix}bias: shape {list(bias.shape)} in the "
                             f"checkpoint, {list(self.bias.shape)} in this layer")
        return packed, state, bias

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        """Check every key of this layer first; load nothing of it if one is wrong."""
        mine = [k[len(prefix):] for k in state_dict if k.startswith(prefix)]
        has_bias = self.bias is not None
        unexpected_keys += [prefix + k for k in mine if not (k == "weight" or k.startswith(
            "weight.") or (k == "bias" and has_bias))]
        missing_keys += [prefix + k for k in ("weight", "bias")[:1 + has_bias] if k not in mine]
        if not any(k == "weight" or k.startswith("weight.") for k in mine):
            return                                             # reported missing above
        try:
            packed, state, bias = self.parse_state_dict(state_dict, prefix)
        except ValueError as error:
            error_msgs.append(str(error))
            return
        self._set_state(packed.to(self.weight_packed.device, copy=True), state)
        if bias is not None and has_bias:
            with torch.no_grad():
                self.bias.copy_(bias)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """nn.Module's load_state_dict, all or nothing: after an error the layer is unchanged."""
        kept = (dict(self._buffers), self.blocksize, self.double_quant, self.quant_type,
                self.weight_dtype, None if self.bias is None else self.bias.detach().clone())
        try:
            return super().load_state_dict(state_dict, strict, assign)
        except Exception:
            buffers, self.blocksize, self.double_quant, self.quant_type, self.weight_dtype, b = kept
            self._buffers.clear()
            self._buffers.update(buffers)
            if b is not None:
                with torch.no_grad():
                    self.bias.copy_(b)
            raise
