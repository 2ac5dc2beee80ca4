"""Person-search network: ResNet backbone, RPN, RoI heads, the full model."""
