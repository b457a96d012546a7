"""A PyTorch transcription of the official ODConv code (OSVAI/ODConv, ICLR
2022): modules/odconv.py, models/od_resnet.py and models/od_mobilenetv2.py at
commit acb771c4, for output-parity tests of `convert.from_odconv`.

Module names, parameter shapes and the forward are the official ones (so the
state_dict keys are the official checkpoints'); comments mark what is
abbreviated (the forward of the ResNet blocks, elided in our copy of the
source, is torchvision's, which the official file follows). Nothing here is
imported by the library.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


# --- modules/odconv.py ------------------------------------------------------

class Attention(nn.Module):
  def __init__(self, in_planes, out_planes, kernel_size, groups=1,
               reduction=0.0625, kernel_num=4, min_channel=16):
    super().__init__()
    attention_channel = max(int(in_planes * reduction), min_channel)
    self.kernel_size = kernel_size
    self.kernel_num = kernel_num
    self.temperature = 1.0

    self.avgpool = nn.AdaptiveAvgPool2d(1)
    self.fc = nn.Conv2d(in_planes, attention_channel, 1, bias=False)
    self.bn = nn.BatchNorm2d(attention_channel)
    self.relu = nn.ReLU(inplace=True)

    self.channel_fc = nn.Conv2d(attention_channel, in_planes, 1, bias=True)
    self.func_channel = self.get_channel_attention

    if in_planes == groups and in_planes == out_planes:  # depth-wise
      self.func_filter = self.skip
    else:
      self.filter_fc = nn.Conv2d(attention_channel, out_planes, 1, bias=True)
      self.func_filter = self.get_filter_attention

    if kernel_size == 1:  # point-wise convolution
      self.func_spatial = self.skip
    else:
      self.spatial_fc = nn.Conv2d(attention_channel,
                                  kernel_size * kernel_size, 1, bias=True)
      self.func_spatial = self.get_spatial_attention

    if kernel_num == 1:
      self.func_kernel = self.skip
    else:
      self.kernel_fc = nn.Conv2d(attention_channel, kernel_num, 1, bias=True)
      self.func_kernel = self.get_kernel_attention

    self._initialize_weights()

  def _initialize_weights(self):
    for m in self.modules():
      if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode='fan_out',
                                nonlinearity='relu')
        if m.bias is not None:
          nn.init.constant_(m.bias, 0)
      if isinstance(m, nn.BatchNorm2d):
        nn.init.constant_(m.weight, 1)
        nn.init.constant_(m.bias, 0)

  def update_temperature(self, temperature):
    self.temperature = temperature

  @staticmethod
  def skip(_):
    return 1.0

  def get_channel_attention(self, x):
    return torch.sigmoid(
        self.channel_fc(x).view(x.size(0), -1, 1, 1) / self.temperature)

  def get_filter_attention(self, x):
    return torch.sigmoid(
        self.filter_fc(x).view(x.size(0), -1, 1, 1) / self.temperature)

  def get_spatial_attention(self, x):
    spatial_attention = self.spatial_fc(x).view(
        x.size(0), 1, 1, 1, self.kernel_size, self.kernel_size)
    return torch.sigmoid(spatial_attention / self.temperature)

  def get_kernel_attention(self, x):
    kernel_attention = self.kernel_fc(x).view(x.size(0), -1, 1, 1, 1, 1)
    return F.softmax(kernel_attention / self.temperature, dim=1)

  def forward(self, x):
    x = self.avgpool(x)
    x = self.fc(x)
    x = self.bn(x)
    x = self.relu(x)
    return (self.func_channel(x), self.func_filter(x), self.func_spatial(x),
            self.func_kernel(x))


class ODConv2d(nn.Module):
  def __init__(self, in_planes, out_planes, kernel_size, stride=1, padding=0,
               dilation=1, groups=1, reduction=0.0625, kernel_num=4):
    super().__init__()
    self.in_planes = in_planes
    self.out_planes = out_planes
    self.kernel_size = kernel_size
    self.stride = stride
    self.padding = padding
    self.dilation = dilation
    self.groups = groups
    self.kernel_num = kernel_num
    self.attention = Attention(in_planes, out_planes, kernel_size,
                               groups=groups, reduction=reduction,
                               kernel_num=kernel_num)
    self.weight = nn.Parameter(
        torch.randn(kernel_num, out_planes, in_planes // groups, kernel_size,
                    kernel_size), requires_grad=True)
    self._initialize_weights()

    if self.kernel_size == 1 and self.kernel_num == 1:
      self._forward_impl = self._forward_impl_pw1x
    else:
      self._forward_impl = self._forward_impl_common

  def _initialize_weights(self):
    for i in range(self.kernel_num):
      nn.init.kaiming_normal_(self.weight[i], mode='fan_out',
                              nonlinearity='relu')

  def update_temperature(self, temperature):
    self.attention.update_temperature(temperature)

  def _forward_impl_common(self, x):
    channel_attention, filter_attention, spatial_attention, kernel_attention = (
        self.attention(x))
    batch_size, in_planes, height, width = x.size()
    x = x * channel_attention
    x = x.reshape(1, -1, height, width)
    aggregate_weight = (spatial_attention * kernel_attention *
                        self.weight.unsqueeze(dim=0))
    aggregate_weight = torch.sum(aggregate_weight, dim=1).view(
        [-1, self.in_planes // self.groups, self.kernel_size,
         self.kernel_size])
    output = F.conv2d(x, weight=aggregate_weight, bias=None,
                      stride=self.stride, padding=self.padding,
                      dilation=self.dilation,
                      groups=self.groups * batch_size)
    output = output.view(batch_size, self.out_planes, output.size(-2),
                         output.size(-1))
    output = output * filter_attention
    return output

  def _forward_impl_pw1x(self, x):
    channel_attention, filter_attention, spatial_attention, kernel_attention = (
        self.attention(x))
    x = x * channel_attention
    output = F.conv2d(x, weight=self.weight.squeeze(dim=0), bias=None,
                      stride=self.stride, padding=self.padding,
                      dilation=self.dilation, groups=self.groups)
    output = output * filter_attention
    return output

  def forward(self, x):
    return self._forward_impl(x)


# --- models/od_resnet.py ----------------------------------------------------

def odconv3x3(in_planes, out_planes, stride=1, reduction=0.0625,
              kernel_num=1):
  return ODConv2d(in_planes, out_planes, kernel_size=3, stride=stride,
                  padding=1, reduction=reduction, kernel_num=kernel_num)


def odconv1x1(in_planes, out_planes, stride=1, reduction=0.0625,
              kernel_num=1):
  return ODConv2d(in_planes, out_planes, kernel_size=1, stride=stride,
                  padding=0, reduction=reduction, kernel_num=kernel_num)


class BasicBlock(nn.Module):
  expansion = 1

  def __init__(self, inplanes, planes, stride=1, downsample=None,
               reduction=0.0625, kernel_num=1):
    super().__init__()
    self.conv1 = odconv3x3(inplanes, planes, stride, reduction=reduction,
                           kernel_num=kernel_num)
    self.bn1 = nn.BatchNorm2d(planes)
    self.relu = nn.ReLU(inplace=True)
    self.conv2 = odconv3x3(planes, planes, reduction=reduction,
                           kernel_num=kernel_num)
    self.bn2 = nn.BatchNorm2d(planes)
    self.downsample = downsample
    self.stride = stride

  def forward(self, x):
    identity = x
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    if self.downsample is not None:
      identity = self.downsample(x)
    return self.relu(out + identity)


class Bottleneck(nn.Module):
  expansion = 4

  def __init__(self, inplanes, planes, stride=1, downsample=None,
               reduction=0.0625, kernel_num=1):
    super().__init__()
    self.conv1 = odconv1x1(inplanes, planes, reduction=reduction,
                           kernel_num=kernel_num)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = odconv3x3(planes, planes, stride, reduction=reduction,
                           kernel_num=kernel_num)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = odconv1x1(planes, planes * self.expansion,
                           reduction=reduction, kernel_num=kernel_num)
    self.bn3 = nn.BatchNorm2d(planes * self.expansion)
    self.relu = nn.ReLU(inplace=True)
    self.downsample = downsample
    self.stride = stride

  def forward(self, x):
    identity = x
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    if self.downsample is not None:
      identity = self.downsample(x)
    return self.relu(out + identity)


class OD_ResNet(nn.Module):  # pylint: disable=invalid-name
  def __init__(self, block, layers, num_classes=1000, dropout=0.1,
               reduction=0.0625, kernel_num=1):
    super().__init__()
    self.inplanes = 64
    self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2,
                           padding=3, bias=False)
    self.bn1 = nn.BatchNorm2d(self.inplanes)
    self.relu = nn.ReLU(inplace=True)
    self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
    self.layer1 = self._make_layer(block, 64, layers[0], reduction=reduction,
                                   kernel_num=kernel_num)
    self.layer2 = self._make_layer(block, 128, layers[1], stride=2,
                                   reduction=reduction, kernel_num=kernel_num)
    self.layer3 = self._make_layer(block, 256, layers[2], stride=2,
                                   reduction=reduction, kernel_num=kernel_num)
    self.layer4 = self._make_layer(block, 512, layers[3], stride=2,
                                   reduction=reduction, kernel_num=kernel_num)
    self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    self.dropout = nn.Dropout(p=dropout)
    self.fc = nn.Linear(512 * block.expansion, num_classes)

    for m in self.modules():
      if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
      elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.constant_(m.weight, 1)
        nn.init.constant_(m.bias, 0)
      elif isinstance(m, nn.Linear):
        nn.init.normal_(m.weight, 0, 0.01)
        nn.init.zeros_(m.bias)

  def net_update_temperature(self, temperature):
    for m in self.modules():
      if hasattr(m, 'update_temperature'):
        m.update_temperature(temperature)

  def _make_layer(self, block, planes, blocks, stride=1, reduction=0.625,
                  kernel_num=1):
    downsample = None
    if stride != 1 or self.inplanes != planes * block.expansion:
      downsample = nn.Sequential(
          nn.Conv2d(self.inplanes, planes * block.expansion, kernel_size=1,
                    stride=stride, padding=0, bias=False),
          nn.BatchNorm2d(planes * block.expansion),
      )
    layers = [block(self.inplanes, planes, stride, downsample,
                    reduction=reduction, kernel_num=kernel_num)]
    self.inplanes = planes * block.expansion
    for _ in range(1, blocks):
      layers.append(block(self.inplanes, planes, reduction=reduction,
                          kernel_num=kernel_num))
    return nn.Sequential(*layers)

  def forward(self, x):
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
    x = torch.flatten(self.avgpool(x), 1)
    return self.fc(self.dropout(x))


def od_resnet18(**kwargs):
  return OD_ResNet(BasicBlock, [2, 2, 2, 2], **kwargs)


def od_resnet50(**kwargs):
  return OD_ResNet(Bottleneck, [3, 4, 6, 3], **kwargs)


def od_resnet101(**kwargs):
  return OD_ResNet(Bottleneck, [3, 4, 23, 3], **kwargs)


# --- models/od_mobilenetv2.py -----------------------------------------------

def _make_divisible(v, divisor, min_value=None):
  if min_value is None:
    min_value = divisor
  new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
  if new_v < 0.9 * v:  # round down by at most 10%
    new_v += divisor
  return new_v


class ConvBNReLU(nn.Sequential):
  def __init__(self, in_planes, out_planes, kernel_size=3, stride=1, groups=1,
               norm_layer=nn.BatchNorm2d):
    padding = (kernel_size - 1) // 2
    super().__init__(
        nn.Conv2d(in_planes, out_planes, kernel_size, stride, padding,
                  groups=groups, bias=False),
        norm_layer(out_planes),
        nn.ReLU6(inplace=True))


class ODConvBNReLU(nn.Sequential):
  def __init__(self, in_planes, out_planes, kernel_size=3, stride=1, groups=1,
               norm_layer=nn.BatchNorm2d, reduction=0.0625, kernel_num=1):
    padding = (kernel_size - 1) // 2
    super().__init__(
        ODConv2d(in_planes, out_planes, kernel_size, stride, padding,
                 groups=groups, reduction=reduction, kernel_num=kernel_num),
        norm_layer(out_planes),
        nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
  def __init__(self, inp, oup, stride, expand_ratio,
               norm_layer=nn.BatchNorm2d, reduction=0.0625, kernel_num=1):
    super().__init__()
    self.stride = stride
    hidden_dim = int(round(inp * expand_ratio))
    self.use_res_connect = self.stride == 1 and inp == oup
    layers = []
    if expand_ratio != 1:  # pw
      layers.append(ODConvBNReLU(inp, hidden_dim, kernel_size=1,
                                 norm_layer=norm_layer, reduction=reduction,
                                 kernel_num=kernel_num))
    layers.extend([
        # dw
        ODConvBNReLU(hidden_dim, hidden_dim, stride=stride, groups=hidden_dim,
                     norm_layer=norm_layer, reduction=reduction,
                     kernel_num=kernel_num),
        # pw-linear
        ODConv2d(hidden_dim, oup, 1, 1, 0, reduction=reduction,
                 kernel_num=kernel_num),
        norm_layer(oup),
    ])
    self.conv = nn.Sequential(*layers)

  def forward(self, x):
    if self.use_res_connect:
      return x + self.conv(x)
    return self.conv(x)


class OD_MobileNetV2(nn.Module):  # pylint: disable=invalid-name
  def __init__(self, num_classes=1000, width_mult=1.0, round_nearest=8,
               block=InvertedResidual, norm_layer=nn.BatchNorm2d, dropout=0.2,
               reduction=0.0625, kernel_num=1):
    super().__init__()
    input_channel = 32
    last_channel = 1280
    inverted_residual_setting = [
        # t, c, n, s
        [1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 3, 2], [6, 64, 4, 2],
        [6, 96, 3, 1], [6, 160, 3, 2], [6, 320, 1, 1]]
    input_channel = _make_divisible(input_channel * width_mult, round_nearest)
    self.last_channel = _make_divisible(last_channel * max(1.0, width_mult),
                                        round_nearest)
    features = [ConvBNReLU(3, input_channel, stride=2, norm_layer=norm_layer)]
    for t, c, n, s in inverted_residual_setting:
      output_channel = _make_divisible(c * width_mult, round_nearest)
      for i in range(n):
        stride = s if i == 0 else 1
        features.append(block(input_channel, output_channel, stride,
                              expand_ratio=t, norm_layer=norm_layer,
                              reduction=reduction, kernel_num=kernel_num))
        input_channel = output_channel
    features.append(ODConvBNReLU(input_channel, self.last_channel,
                                 kernel_size=1, norm_layer=norm_layer,
                                 reduction=reduction, kernel_num=kernel_num))
    self.features = nn.Sequential(*features)
    self.classifier = nn.Sequential(
        nn.Dropout(dropout),
        nn.Linear(self.last_channel, num_classes),
    )
    for m in self.modules():
      if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode='fan_out')
        if m.bias is not None:
          nn.init.zeros_(m.bias)
      elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
      elif isinstance(m, nn.Linear):
        nn.init.normal_(m.weight, 0, 0.01)
        nn.init.zeros_(m.bias)

  def net_update_temperature(self, temperature):
    for m in self.modules():
      if hasattr(m, 'update_temperature'):
        m.update_temperature(temperature)

  def forward(self, x):
    x = self.features(x)
    x = nn.functional.adaptive_avg_pool2d(x, 1).reshape(x.shape[0], -1)
    return self.classifier(x)


def od_mobilenetv2_050(**kwargs):
  return OD_MobileNetV2(width_mult=0.5, **kwargs)


def od_mobilenetv2_075(**kwargs):
  return OD_MobileNetV2(width_mult=0.75, **kwargs)


def od_mobilenetv2_100(**kwargs):
  return OD_MobileNetV2(width_mult=1.0, **kwargs)


MODELS = {
    'od_resnet18': od_resnet18, 'od_resnet50': od_resnet50,
    'od_resnet101': od_resnet101, 'od_mobilenetv2_050': od_mobilenetv2_050,
    'od_mobilenetv2_075': od_mobilenetv2_075,
    'od_mobilenetv2_100': od_mobilenetv2_100,
}


def random_images(batch, image_size, generator):
  """Random images in about the ImageNet-normalized range, each with its own
  colour cast, contrast and coarse structure (8x8 noise upsampled, plus
  pixel noise), so that what ODConv's attentions see (global averages) and
  the deep features differ from image to image."""
  f64 = dict(generator=generator, dtype=torch.float64)
  coarse = F.interpolate(2 * torch.rand(batch, 3, 8, 8, **f64) - 1,
                         size=(image_size, image_size), mode='bilinear',
                         align_corners=False)
  fine = 2 * torch.rand(batch, 3, image_size, image_size, **f64) - 1
  cast = 1.2 * torch.rand(batch, 3, 1, 1, **f64) - 0.6
  contrast = 0.5 + torch.rand(batch, 1, 1, 1, **f64)
  return cast + contrast * (coarse + 0.3 * fine)


def _random_bn_bias(uniform, like):
  """Mostly 0.36-0.84 (after a BatchNorm with its own statistics, most
  activations pass the ReLU: see `randomize`), a tenth of the channels
  around 6 (ReLU6's cap) and a tenth around 0 (the ReLU's kink)."""
  value, which = uniform(like), uniform(like)
  bias = 0.6 * (0.6 + 0.8 * value)
  bias = torch.where(which < 0.1, 5.5 + value, bias)
  return torch.where(which > 0.9, value - 0.5, bias)


def randomize(model, seed=0, calibration_batch=6, image_size=64):
  """`model` in float64 and eval mode, with every parameter and BatchNorm
  statistic random, and conditioned so that a float32 run of it agrees
  with the float64 one to ~1e-6 while its logits still depend on every
  layer.

  The official init leaves biases at 0 and BatchNorm at identity, which
  would not exercise their mapping. Random running statistics make a deep
  network's activations blow up or die out. With statistics of its own
  (train mode on a calibration batch) and zero-mean BatchNorm biases, a
  ReLU network amplifies small errors by ~1.2x per layer: after the ~50
  layers of OD-MobileNetV2, float32 rounding reached 1e-3 of the logits in
  our trials. So: running statistics from a calibration batch, the
  variance floored at 0.3x the layer's median (a channel constant over the
  batch would amplify rounding by 1/sqrt(eps)), then perturbed; the
  attentions' BatchNorms (over [B, A] pooled features, whose spread across
  a batch can be tiny) get the second moment as variance; BatchNorm scales
  0.8-1.2 and biases from `_random_bn_bias` (most units in the ReLU's
  linear part, some at ReLU6's cap and at 0); conv and linear biases
  random; the classifier's weights have std 1/sqrt(fan_in), so features,
  not its bias, dominate the logits."""
  model.double()
  generator = torch.Generator().manual_seed(seed)
  uniform = lambda t: torch.rand(t.shape, generator=generator,
                                 dtype=torch.float64)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, nn.BatchNorm2d):
        module.reset_running_stats()
        module.momentum = None  # a cumulative average: the batch's stats
        module.weight.copy_(0.8 + 0.4 * uniform(module.weight))
        module.bias.copy_(_random_bn_bias(uniform, module.bias))
      elif isinstance(module, (nn.Conv2d, nn.Linear)):
        if module.bias is not None:
          module.bias.copy_(0.2 * uniform(module.bias) - 0.1)
        if isinstance(module, nn.Linear):
          module.weight.copy_(torch.randn(
              module.weight.shape, generator=generator, dtype=torch.float64)
                              / module.weight.shape[1] ** 0.5)
    model.train()
    model(random_images(calibration_batch, image_size, generator))
    for module in model.modules():
      if isinstance(module, Attention):
        module.bn.running_var.add_(module.bn.running_mean ** 2)
    for module in model.modules():
      if isinstance(module, nn.BatchNorm2d):
        var = module.running_var
        var.clamp_(min=0.3 * var.median().item())
        std = var.sqrt()
        module.running_mean.add_(0.2 * std * (uniform(std) - 0.5))
        module.running_var.mul_(0.8 + 0.4 * uniform(std))
        module.momentum = 0.1
        module.num_batches_tracked.fill_(7)
  return model.eval()
