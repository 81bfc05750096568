"""Other heads and checkpoints in and out: state-dict layouts (the official code's, timm's, this
package's; layouts.py), conversion of existing heads (convert.py), timm models (timm_head.py)."""
