"""Jobs: convert, denoise, export, follow, train and run, each opening its store once,
planning pieces, running them on the cluster and finalising."""
