"""The workloads' models, one readable file each: a Transformer encoder-decoder (:mod:`.transformer`), a GPT decoder
(:mod:`.gpt`), ResNet and MobileNet-v2 (:mod:`.cnn`), a QuartzNet-style CTC model (:mod:`.quartznet`)."""
