"""Generation: the diffusion / flow-matching math (`diffusion`) and sample-based scores
(`metrics`) that the generation task (`paperzoo.tasks.generation`) and its models use."""
