"""The one training loop the four scripts share."""
