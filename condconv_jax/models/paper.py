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

# CondConv's successors beside it, from their own papers (docs/paper.md,
# "The dynamic-convolution family"). Each row: (label, model name,
# get_model kwargs, published params, published MADDs, source). 'V' =
# ODConv's official README (its re-implementation's table); 'U' = DyConv's
# paper as quoted by secondary sources (no official code).
# ODConv's ResNet-50/101 MADDs count ResNet v1 (stride on the first 1x1 of a
# downsampling block) although its code is v1.5 (stride on the 3x3), like
# ours: v1.5 costs RESNET_V15_EXTRA_MACS more at 224x224 (3/4 of the first
# 1x1 conv of stages 2-4: 3 x 0.75 x 56^2 x 256 x 128).
RESNET_V15_EXTRA_MACS = 3 * 3 * 56 * 56 * 256 * 128 // 4
DYNAMIC_PAPER_COSTS = (
    ('ResNet-18', 'od_resnet18', dict(num_experts=0), 11.69e6, 1.814e9, 'V'),
    ('OD-ResNet-18 (1x)', 'od_resnet18', dict(num_experts=1), 11.94e6,
     1.838e9, 'V'),
    ('OD-ResNet-18 (4x)', 'od_resnet18', dict(num_experts=4), 44.90e6,
     1.916e9, 'V'),
    ('DY-ResNet-18 (4)', 'dy_resnet18', dict(num_experts=4), 42.7e6, 1.85e9,
     'U'),
    ('ResNet-50', 'od_resnet50', dict(num_experts=0), 25.56e6, 3.858e9, 'V'),
    ('OD-ResNet-50 (1x)', 'od_resnet50', dict(num_experts=1), 28.64e6,
     3.916e9, 'V'),
    ('OD-ResNet-50 (4x)', 'od_resnet50', dict(num_experts=4), 90.67e6,
     4.080e9, 'V'),
    ('ResNet-101', 'od_resnet101', dict(num_experts=0), 44.55e6, 7.570e9,
     'V'),
    ('OD-ResNet-101 (1x)', 'od_resnet101', dict(num_experts=1), 50.82e6,
     7.675e9, 'V'),
    ('OD-ResNet-101 (2x)', 'od_resnet101', dict(num_experts=2), 90.44e6,
     7.802e9, 'V'),
    ('MobileNetV2 1.0', 'od_mobilenetv2_100', dict(num_experts=0), 3.50e6,
     300.8e6, 'V'),
    ('OD-MobileNetV2 1.0 (1x)', 'od_mobilenetv2_100', dict(num_experts=1),
     4.94e6, 311.8e6, 'V'),
    ('OD-MobileNetV2 1.0 (4x)', 'od_mobilenetv2_100', dict(num_experts=4),
     11.51e6, 327.1e6, 'V'),
    ('DY-MobileNetV2 1.0 (4)', 'dy_mobilenetv2_100', dict(num_experts=4),
     11.1e6, 312.9e6, 'U'),
    ('MobileNetV2 0.75', 'od_mobilenetv2_075', dict(num_experts=0), 2.64e6,
     209.1e6, 'V'),
    ('OD-MobileNetV2 0.75 (1x)', 'od_mobilenetv2_075', dict(num_experts=1),
     3.51e6, 217.1e6, 'V'),
    ('OD-MobileNetV2 0.75 (4x)', 'od_mobilenetv2_075', dict(num_experts=4),
     7.50e6, 226.3e6, 'V'),
    ('MobileNetV2 0.5', 'od_mobilenetv2_050', dict(num_experts=0), 1.97e6,
     97.1e6, 'V'),
    ('OD-MobileNetV2 0.5 (1x)', 'od_mobilenetv2_050', dict(num_experts=1),
     2.43e6, 101.8e6, 'V'),
    ('OD-MobileNetV2 0.5 (4x)', 'od_mobilenetv2_050', dict(num_experts=4),
     4.44e6, 106.4e6, 'V'),
    ('DY-MobileNetV2 0.5 (4)', 'dy_mobilenetv2_050', dict(num_experts=4),
     4.0e6, 101.4e6, 'U'),
)

# Each family on one backbone, for the side-by-side table: (backbone label,
# [(family label, model name, kwargs)]).
FAMILY_COMPARISON = (
    ('MobileNetV2 1.0', (
        ('static', 'mobilenet_v2', dict(num_experts=0)),
        ('CondConv (8)', 'mobilenet_v2', dict(num_experts=8)),
        ('DyConv (4)', 'dy_mobilenetv2_100', dict(num_experts=4)),
        ('ODConv (1x)', 'od_mobilenetv2_100', dict(num_experts=1)),
        ('ODConv (4x)', 'od_mobilenetv2_100', dict(num_experts=4)))),
    ('ResNet-50', (
        ('static', 'resnet50', dict(num_experts=0)),
        ('CondConv (8)', 'resnet50', dict(num_experts=8)),
        ('DyConv (4)', 'dy_resnet50', dict(num_experts=4)),
        ('ODConv (1x)', 'od_resnet50', dict(num_experts=1)),
        ('ODConv (4x)', 'od_resnet50', dict(num_experts=4)))),
)
