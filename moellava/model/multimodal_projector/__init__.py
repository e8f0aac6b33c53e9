from moellava.model.multimodal_projector.builder import LlavaProjector, build_image_projector, build_projector

__all__ = ["LlavaProjector", "build_image_projector", "build_projector"]
