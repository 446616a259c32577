"""Pure-functional ops on arrays (no Flax): the linear recurrences, softmax attention,
feature maps, and the token-by-token references they are tested against.

  gla(q, k, v, g=None, *, scale, initial_state, output_final_state, cu_seqlens, method,
      chunk_size, normalize)                     -> (o, final_state)
  delta_rule(q, k, v, beta, g=None, *, same)      -> (o, final_state)
  gla_step(state, q, k, v, g=None, *, scale, normalize)    -> (o_t, state)
  delta_rule_step(state, q, k, v, beta, g=None, *, scale)  -> (o_t, state)
  attention(q, k, v, *, causal, window, num_sinks, segment_ids, ..., method)
  merge_attention([(o, lse), ...])                 attention over disjoint key sets combined
  feature_maps.{identity, elu, relu, softmax, silu_l2, l2, dpfp, t2r, hedgehog}

`method=` of the recurrences is one of METHODS: auto, recurrent, parallel, chunk, assoc_scan,
pallas; of `attention`, one of ATTENTION_METHODS: auto, parallel, chunk, cudnn, pallas.
"""
from linjax.ops import feature_maps, reference
from linjax.ops._common import METHODS
from linjax.ops.delta import delta_rule, delta_rule_step
from linjax.ops.gla import gla, gla_step
from linjax.ops.softmax import ATTENTION_METHODS, attention, attention_mask, merge_attention

__all__ = ["ATTENTION_METHODS", "METHODS", "attention", "attention_mask", "delta_rule",
           "delta_rule_step", "feature_maps", "gla", "gla_step", "merge_attention", "reference"]
