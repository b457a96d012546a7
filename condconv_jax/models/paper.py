"""The paper's cost figures for each model variant (docs/paper.md).

Each row: (label, model name, get_model kwargs, paper params or None, paper
MADDs, source). Source 'V' = verified in the paper or official code, 'U' =
unverified (recalled/secondary), a target to check rather than a fact.
"""

PAPER_COSTS = (
    ('MobileNetV1 1.0', 'mobilenet_v1', {}, 4.23e6, 569e6, 'V'),
    ('CC-MobileNetV1 1.0 (8)', 'mobilenet_v1', dict(num_experts=8), None,
     600e6, 'U'),
    ('MobileNetV1 0.5', 'mobilenet_v1', dict(width=0.5), None, None, ''),
    ('MobileNetV1 0.25', 'mobilenet_v1', dict(width=0.25), None, None, ''),
    ('MobileNetV2 1.0', 'mobilenet_v2', {}, 3.5e6, 300e6, 'U'),
    ('CC-MobileNetV2 1.0 (8)', 'mobilenet_v2', dict(num_experts=8), 27.5e6,
     329e6, 'U'),
    ('MnasNet-A1', 'mnasnet_a1', {}, 3.9e6, 312e6, 'U'),
    ('CC-MnasNet-A1 (8)', 'mnasnet_a1', dict(num_experts=8), None, 325e6, 'U'),
    ('ResNet-50', 'resnet50', {}, 25.6e6, 4.1e9, 'U'),
    ('CC-ResNet-50 (8)', 'resnet50', dict(num_experts=8), None, 4213e6, 'U'),
    ('EfficientNet-B0', 'efficientnet_b0', {}, 5.29e6, 390e6, 'V'),
    ('CC-EfficientNet-B0 (4)', 'efficientnet_b0', dict(num_experts=4),
     13_314_116, 402e6, 'V'),
    ('CC-EfficientNet-B0 (8)', 'efficientnet_b0', dict(num_experts=8),
     24_013_284, 413e6, 'V'),
    ('CC-EfficientNet-B0 d1.1 (8)', 'efficientnet_b0',
     dict(num_experts=8, depth=1.1), 39_715_968, 614e6, 'V'),
)

# The COCO detector (MobileNetV1 1.0 SSD300), paper figures [V]: minival mAP
# static and with CondConv, and the relative inference cost of CondConv.
# The paper's placement and expert count are not stated (docs/paper.md).
PAPER_SSD = dict(static_map=20.3, condconv_map=22.4, relative_cost=0.04)
