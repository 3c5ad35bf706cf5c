"""One module per endpoint family; handlers stay short and call into serving."""
