"""Optional integrations with training frameworks (mmsegmentation, PaddleSeg); each imports its framework lazily."""
