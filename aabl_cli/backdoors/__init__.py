"""The paper's backdoor attacks past BadNets and Blend, one module each; `aabl_cli.poison` registers them.

Every trigger works on float `(N, 3, H, W)` tensors in [0, 1] and returns a new tensor.
The attacks that need a network (IAB, SSBA, CLB) train it here, on the folder being poisoned.
"""
