"""The `dynts` command line: main builds the parser, args holds shared flags, one module per command group."""
