"""Mail Security: policy objects, message stores, message tracking and retention."""
