"""StyleGAN2-ADA networks whose state dicts match NVlabs/stylegan2-ada-pytorch one to one."""

from .networks import (
    Conv2dLayer,
    Discriminator,
    DiscriminatorBlock,
    DiscriminatorEpilogue,
    FullyConnectedLayer,
    Generator,
    MappingNetwork,
    MinibatchStdLayer,
    SynthesisBlock,
    SynthesisLayer,
    SynthesisNetwork,
    ToRGBLayer,
)

# Descriptive aliases for code outside this package.
StyleGAN2Generator = Generator
StyleGAN2Discriminator = Discriminator

__all__ = [
    "Conv2dLayer",
    "Discriminator",
    "DiscriminatorBlock",
    "DiscriminatorEpilogue",
    "FullyConnectedLayer",
    "Generator",
    "MappingNetwork",
    "MinibatchStdLayer",
    "StyleGAN2Discriminator",
    "StyleGAN2Generator",
    "SynthesisBlock",
    "SynthesisLayer",
    "SynthesisNetwork",
    "ToRGBLayer",
]
