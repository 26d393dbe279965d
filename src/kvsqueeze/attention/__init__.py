"""Read paths: `reference` (dequantize into a workspace, then any attention) and `fused`
(attention on the stored codes, through `parts.AttentionParts` behind `packed_view.PackedKV`);
`dense` is the reference attention for the options transformers' SDPA lacks (sinks, soft-capping,
attention weights)."""
