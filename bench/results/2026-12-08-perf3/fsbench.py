import os,sys,time,multiprocessing as mp
def run(i, mode, n, size, q):
    p=f'/tmp/perf3/fsb{i}'
    if os.path.exists(p): os.unlink(p)
    fd=os.open(p,os.O_CREAT|os.O_WRONLY)
    if mode=='zero':
        os.write(fd,b'\0'*(n*size+4096)); os.fsync(fd); os.lseek(fd,0,0)
    elif mode=='falloc':
        os.posix_fallocate(fd,0,n*size+4096); os.fsync(fd)
    buf=b'x'*size; ts=[]
    for _ in range(n):
        os.write(fd,buf); t=time.perf_counter(); os.fdatasync(fd); ts.append(time.perf_counter()-t)
    os.close(fd); os.unlink(p)
    ts.sort(); q.put((sum(ts)/n*1e6, ts[n//2]*1e6, ts[int(n*.99)]*1e6))
for mode in sys.argv[1].split(','):
    q=mp.Queue(); ps=[mp.Process(target=run,args=(i,mode,2000,30000,q)) for i in range(3)]
    t=time.time(); [p.start() for p in ps]; [p.join() for p in ps]
    print(mode, 'mean/p50/p99 us', [tuple(round(x) for x in q.get()) for _ in ps], 'wall', round(time.time()-t,2))
