"""A real Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager,
kube-scheduler, kwok) run as local processes for the e2e tier. build.sh builds it."""
